"""Closed-form counts the tests compare fxgrow's figures against (timm ViTs: class token,
learned position embedding, pre-norm blocks, qkv bias, head on the class token)."""

import fxgrow


def vit_shape(*, dim, depth, heads, head_dim, hidden, classes, patch=16, img=224, chans=3):
    """The keyword arguments of :func:`vit_params` and :func:`vit_flops` for a ViT given by
    its widths (``head_dim`` may differ from ``dim // heads`` in a reduced model)."""
    return dict(patch_in=chans * patch * patch, d=dim, tokens=(img // patch) ** 2 + 1,
                depth=depth, qkv_out=3 * heads * head_dim, attn_dim=heads * head_dim,
                hidden=hidden, classes=classes)


def vit_params(*, patch_in, d, tokens, depth, qkv_out, attn_dim, hidden, classes):
    """Parameters of a timm VisionTransformer."""
    patch = patch_in * d + d
    cls_pos = d + tokens * d
    block = (
        2 * d  # norm1
        + d * qkv_out + qkv_out  # qkv
        + attn_dim * d + d  # proj
        + 2 * d  # norm2
        + d * hidden + hidden  # fc1
        + hidden * d + d  # fc2
    )
    return patch + cls_pos + depth * block + 2 * d + d * classes + classes


def vit_flops(*, batch=1, patch_in, d, tokens, depth, qkv_out, attn_dim, hidden, classes):
    """One multiply-add = one flop; attention's q k^T and AV products counted; layer norms at
    fvcore's 5 flops per element (affine); elementwise ops free; head on the class token."""
    n = tokens
    norm = 5 * n * d
    block = (
        n * d * qkv_out  # qkv
        + 2 * n * n * attn_dim  # q k^T and attn @ v, all heads
        + n * attn_dim * d  # proj
        + 2 * n * d * hidden  # fc1 and fc2
        + 2 * norm
    )
    per_image = (n - 1) * patch_in * d + depth * block + norm + d * classes
    return batch * per_image


def growth_params(gm, plan, mode="paper"):
    """Parameters a growth plan adds to ``gm``: per neuron of fan-in d, 2 (d + 1) in paper
    mode and d + 1 fused (d instead of d + 1 without a bias)."""
    copies = {"paper": 2, "fused": 1}[mode]
    sites = fxgrow.linear_sites(gm)
    return sum(
        copies * len(indices) * (sites[t][0].in_features + int(sites[t][0].has_bias(gm)))
        for t, indices in plan.items()
    )


def paper_selection(eigenvalues, budget, layer_threshold):
    """The paper's selection rule written out, on ``{target: eigenvalues}`` in graph order:
    negative eigenvalues only, targets with fewer than ``layer_threshold`` of them skipped,
    most negative first (ties by graph order, then neuron index), ``budget`` neurons."""
    ranked = []
    for rank, (target, values) in enumerate(eigenvalues.items()):
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        negative = [(v, rank, i, target) for i, v in enumerate(values) if v < 0]
        if len(negative) >= layer_threshold:
            ranked += negative
    plan = {}
    for _, _, i, target in sorted(ranked)[:budget]:
        plan.setdefault(target, []).append(i)
    return {t: sorted(v) for t, v in plan.items()}
