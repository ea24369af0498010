"""own-app ServerApp: FedQSN with Flower's defaults, the server's own test set."""

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedqsn_flwr import FedQSN, init_from_secret, new_secret, policy_for_model
from own_app.task import Net, load_data, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedQSN from a random start; print the global model's accuracy each round."""
    secret = new_secret()  # 32 random bytes no client sees; keep them to reproduce a run
    # Net() alone takes torch's 32-bit process seed, which a client could search
    model = init_from_secret(Net(), secret)
    strategy = FedQSN(
        policy_for_model(model),  # which tensors are masked, along which axis
        server_mask_ratio=context.run_config["server-mask-ratio"],  # p1
        client_mask_ratio=context.run_config["client-mask-ratio"],  # p2
        server_secret=secret,  # the server mask and every client mask derive from it
    )
    x, y = load_data()  # the server's own test set

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, x, y)
        print(f"own-app: round {server_round} global accuracy {accuracy:.4f}")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=context.run_config["num-server-rounds"],
        evaluate_fn=global_evaluate,
    )
