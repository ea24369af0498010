"""Experiment tools on top of the app: simulate, compare, plots, attacks, launch a deployment."""
