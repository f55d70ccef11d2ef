"""Multi-LoRA serving in the executor: adapter folders (adapter.py), the LoRA-wrapped linear layers
(layers.py) and the adapters' host set and GPU slots (manager.py)."""
