"""Issue 28 mutant survivor: the toy report's `subject_acc` ignoring the shape. Scored with the shipped
evaluator on rendered images: the subject's colours on another shape are not the subject."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from arbooth.toy.models import ToyEvaluator
from arbooth.toy.report import is_subject, score
from arbooth.toy.world import DEMO_SUBJECT, images_to_array, subject_views


def _images(attrs, n: int) -> torch.Tensor:
    arr = images_to_array(subject_views(attrs, n))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255


def test_subject_acc_needs_the_subjects_shape():
    attrs = DEMO_SUBJECT.to_dict()
    assert is_subject(attrs, attrs) and not is_subject({**attrs, "shape": "circle"}, attrs)
    assert is_subject({**attrs, "shape": "circle"}, attrs, shape=False)
    ev = ToyEvaluator()
    circle = dataclasses.replace(DEMO_SUBJECT, shape="circle")  # the subject's colours, another shape
    subject, other = _images(DEMO_SUBJECT, 4), _images(circle, 4)
    assert all(p["shape"] == "circle" and is_subject(p, attrs, shape=False) for p in ev.attributes(other))
    imgs_RS3HW = torch.stack([subject, subject, other])  # row 0: the class prompt
    out = score(ev, imgs_RS3HW, ["a star", "a <S*> star", "a <S*> star on a blue background"], subject, attrs)
    rows = out["per_prompt"]
    assert rows[1]["subject_acc"] == 1.0 and rows[2]["subject_acc"] == 0.0 and out["mean"]["subject_acc"] == 0.5
