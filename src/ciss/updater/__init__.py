"""The updater: base training, add-classes and the losses behind them."""
