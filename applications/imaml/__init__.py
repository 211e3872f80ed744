"""Implicit MAML few-shot image classification: data, model, algorithms and the train / evaluate tool."""
