"""Stages: each builds its model, data and loss from the layers below and hands them to the loop."""
