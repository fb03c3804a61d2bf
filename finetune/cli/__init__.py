"""`finetune VERB ...`: the command line, one module per verb group; the only place that prints."""
