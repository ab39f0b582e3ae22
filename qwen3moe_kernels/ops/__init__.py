"""The public ops. Each module ``ops/<stem>.py`` checks arguments, registers ``torch.ops.qwen3moe.<stem>``
(with a fake implementation, and autograd where a backward exists) and picks the implementation that runs."""
