"""Training engine: the LightningModule, builders, callbacks, optimizer and schedules, loading."""
