"""data_tools: everything between a file on disk and a batch of tensors."""
