"""Small pieces several test files share."""

import torch


def copy_into_padded(src, dst):
    """Copy weights between a plain and a padded-vocabulary model: vocabulary rows go first."""
    with torch.no_grad():
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            dst_params[name][: p.size(0)].copy_(p)


def take_steps(model, optimizer, x, steps=3):
    """``steps`` optimizer steps on the batch ``x`` predicting itself: the same gradients for two
    models, so two optimizers can be compared."""
    for _ in range(steps):
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def count_graph_decoders(monkeypatch) -> list:
    """A list that grows by one each time a ``slm_utils.GraphDecoder`` is made."""
    import slm_utils

    made, init = [], slm_utils.GraphDecoder.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(slm_utils.GraphDecoder, "__init__", counting_init)
    return made
