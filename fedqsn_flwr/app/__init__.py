"""This project's Flower app.

Server and client handlers, config, data, models, training, results.
"""
