"""The toy world (benchmarks/toyworld.py): its pixel measure reads pictures back, the committed
toy model (tests/fixtures/toyworld-sd) draws what its captions say, and DreamBooth through the
real train_dreambooth.py teaches it a subject it never saw, with prior preservation keeping
"a photo of a circle" from turning into that subject.

The margins were set from benchmarks/RESULTS.md (several seeds): each sits several standard
deviations inside what the runs measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import toyworld  # noqa: E402

TOY_MODEL = ROOT / "tests" / "fixtures" / "toyworld-sd"

# Measured over seeds 0-4 (benchmarks/RESULTS.md): accuracies 1.00 / 0.97 / 1.00 when pretrained;
# with prior preservation and the text encoder, fidelity 0.69-0.91 (0.78 +- 0.08) and binding
# 0.66-0.81 (0.75 +- 0.06); without prior preservation "a photo of a circle" shows the subject in
# 0.94-1.00 of images, with it in 0.00-0.09.
COLOUR_MIN, SHAPE_MIN, BACKGROUND_MIN = 0.8, 0.75, 0.8
BASE_FIDELITY_MAX = 0.1
FIDELITY_MIN = 0.5
BINDING_MIN = 0.45
DRIFT_SHARE_MIN = 0.6
PRIOR_EFFECT_MIN = 0.45


def test_measure_reads_back_every_drawn_attribute():
    rng = np.random.default_rng(1)
    pictures = [toyworld.random_picture(rng) for _ in range(300)]
    described = [toyworld.describe(toyworld.draw(p)) for p in pictures]
    for attribute in ("shape", "colour", "background"):
        assert [getattr(d, attribute) for d in described] == [getattr(p, attribute) for p in pictures], attribute
    assert max(abs(d.signature) for d in described) < 0.1  # one colour: no left/right difference


def test_subject_signature_is_directional():
    rng = np.random.default_rng(2)
    subject = [toyworld.describe(toyworld.draw(toyworld.subject_picture(rng, background))) for background in
               ("white", "black", "gray") * 10]
    assert min(d.signature for d in subject) > 0.8
    assert {d.shape for d in subject} == {"circle"}
    mirrored = toyworld.random_picture(rng, shape="circle", two_tone=tuple(reversed(toyworld.SUBJECT_COLOURS)))
    assert toyworld.describe(toyworld.draw(mirrored)).signature < -0.8
    summary = toyworld.summarise(subject, {"shape": "circle"})
    assert summary["subject_share"] == 1.0 and summary["shape_accuracy"] == 1.0


def test_identifier_is_one_token_that_pretraining_never_shows(tmp_path):
    tokenizer = toyworld.build_tokenizer(tmp_path)
    for word in toyworld.vocabulary_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    rng = np.random.default_rng(3)
    words = {w for _ in range(2000) for w in toyworld.caption(toyworld.random_picture(rng), rng).split()}
    assert words.isdisjoint(toyworld.RARE_WORDS)
    assert set(toyworld.FILLERS) <= words  # the slot before the noun sees words that change nothing
    committed = toyworld.load(TOY_MODEL).tokenizer
    assert committed.tokenize(toyworld.INSTANCE_PROMPT) == tokenizer.tokenize(toyworld.INSTANCE_PROMPT)


@pytest.mark.slow
def test_toy_model_draws_what_its_captions_say():
    accuracy = toyworld.attribute_accuracy(toyworld.load(TOY_MODEL), per_prompt=2)
    # chance: colour 0.25, shape 0.33, background 0.33
    assert accuracy["colour"] >= COLOUR_MIN and accuracy["shape"] >= SHAPE_MIN
    assert accuracy["background"] >= BACKGROUND_MIN, accuracy


@pytest.fixture(scope="module")
def dreambooth_runs():
    """DreamBooth on the subject through the real scripts, with and without prior preservation
    (text encoder trained, the study's defaults), seed 0, against the same pretrained baseline."""
    settings = {prior: toyworld.StudySettings(prior_preservation=prior, train_text_encoder=True,
                                              measured=("instance", "class"))
                for prior in (True, False)}
    base = toyworld.measure_model(toyworld.load(TOY_MODEL), settings[True], seed=0)
    return {prior: toyworld.study_run(TOY_MODEL, s, seed=0, base=base) for prior, s in settings.items()}


@pytest.mark.slow
def test_dreambooth_learns_the_subject_and_binds_it_to_the_identifier(dreambooth_runs):
    with_prior = dreambooth_runs[True]
    assert with_prior["base_fidelity"] <= BASE_FIDELITY_MAX  # the world never showed the subject
    assert with_prior["fidelity"] >= FIDELITY_MIN
    assert with_prior["binding"] >= BINDING_MIN, with_prior


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_from_becoming_the_subject(dreambooth_runs):
    with_prior, without = dreambooth_runs[True], dreambooth_runs[False]
    assert without["fidelity"] >= FIDELITY_MIN  # both learn the subject ...
    # ... but without the prior loss, "a photo of a circle" draws it too (language drift).
    assert without["class_subject_share"] >= DRIFT_SHARE_MIN
    assert without["class_subject_share"] - with_prior["class_subject_share"] >= PRIOR_EFFECT_MIN
