"""Tests of the op table and the skeletons."""

import pytest

from memnas_jax import encoding as enc
from memnas_jax import space


def test_op_table_in_authors_index_order(golden_candidates):
    authors = golden_candidates["op_index"]
    ours = {str(i): name for i, name, _ in space.OP_TABLE}
    # the authors call op 3 "fac_conv_1x7_7x1"; same op
    assert {**ours, "3": "fac_conv_1x7_7x1"} == authors
    assert enc.OP_NAMES == tuple(name for _, name, _ in space.OP_TABLE)


def test_cifar_skeleton():
    sk = space.cifar_skeleton(width=32, schedule="doubling")
    assert sk.widths == (32, 32, 64, 64, 128)
    assert sk.strides == (1, 2, 1, 2, 1)
    assert sk.spatial_sizes() == (32, 16, 16, 8, 8)
    assert sk.head == "maxpool_dense" and sk.stem_width == 0 and sk.num_classes == 10
    assert space.cifar_skeleton(64).widths == (64,) * 5
    assert space.Skeleton.from_dict(sk.to_dict()) == sk


def test_imagenet_skeleton():
    sk = space.imagenet_skeleton(width=32)
    assert sk.spatial_sizes() == (56, 28, 14, 7, 7)
    assert sk.widths == (32, 64, 128, 256, 256) and sk.stem_width == 32
    small = space.imagenet_skeleton(width=16, image_size=32)
    assert small.stem_width == 0 and small.spatial_sizes() == (16, 8, 4, 2, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(widths=(8, 8), strides=(1,)), "2 widths but 1 strides"),
    (dict(strides=(1, 3, 1, 2, 1)), "strides 1 or 2"),
    (dict(head="gap"), "head 'gap'"),
    (dict(removed_op="zero"), "removed_op 'zero'"),
    (dict(image_size=4), "smaller than the head pool"),
])
def test_skeleton_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        space.Skeleton(**kwargs)
    with pytest.raises(ValueError, match="unknown fields"):
        space.Skeleton.from_dict({"width": 3})
    with pytest.raises(ValueError, match="unknown width schedule"):
        space.block_widths(8, "triple")
