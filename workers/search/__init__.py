"""Search orchestration and tracking (top layer): the driver, Tune callbacks, scheduler,
sampler, the MLflow outbox, tracking and the live views.
"""
