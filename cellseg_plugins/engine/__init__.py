"""Engine: data sets, training, evaluation and inference. Knows models only through the plugin
protocol (forward → logits, auxiliary losses, per-epoch / per-step callbacks)."""
