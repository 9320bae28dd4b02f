"""The network (`model.create_model`, its weights), test-time views (`tta`) and the scores (`metrics`)."""
