"""own-app: a minimal Flower app that trains its own PyTorch model with FedQSN."""
