"""own-app ClientApp: ordinary Flower handlers, three FedQSN helper calls."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedqsn_flwr import freeze_hidden, load_received, train_reply
from own_app.task import Net, load_data, test, train

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train whatever the server sent (a proxy) on the local data; reply with the update."""
    model = Net()
    received = load_received(model, msg.content)  # a FedQSN proxy, or FedAvg's arrays
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    epochs, lr = context.run_config["local-epochs"], context.run_config["learning-rate"]
    with freeze_hidden(model, received):  # units the server hid stay zero
        loss = train(model, x, y, epochs, lr)
    return train_reply(msg, model, received, num_examples=len(y), metrics={"train_loss": loss})


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate whatever the server sent on the local data."""
    model = Net()
    load_received(model, msg.content)
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, accuracy = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
