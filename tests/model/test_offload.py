"""finetune.model.memory_tricks' offload with prefetch (`train.offload_prefetch`): on the CPU the
streams are absent but the order logic runs; loss and gradients equal the plain path, and each
unpack started the copy back of the tensor saved before it."""

from __future__ import annotations

from tests.model.test_attention import batches, loss_and_grads, model, samples  # noqa: F401 (fixtures)


def test_offload_with_prefetch_leaves_loss_unchanged(model, samples, monkeypatch):  # noqa: F811
    import finetune.model.memory_tricks as tr
    from finetune.model.load import enable_gradient_checkpointing

    batch = batches(model, samples)["padded"]
    enable_gradient_checkpointing(model)  # offloading is meant for checkpointed layer inputs
    try:
        loss, grads = loss_and_grads(model, batch)
        used = []

        class Counting(tr.ActivationOffload):
            def __init__(self, **kw):
                super().__init__(**kw)
                used.append(self)

        monkeypatch.setattr(tr, "ActivationOffload", Counting)
        with tr.offload_activations("prefetch"):
            loss_p, grads_p = loss_and_grads(model, batch)
    finally:
        model.gradient_checkpointing_disable()
    assert loss_p == loss
    assert max(float((grads[k] - grads_p[k]).abs().max()) for k in grads) == 0.0
    layers = model.config.get_text_config().num_hidden_layers
    assert len(used) == 1 and used[0].saved_bytes > 0
    # every layer input but the first came back ahead of its layer's recompute
    assert used[0].prefetched >= layers - 1
