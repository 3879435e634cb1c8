"""Serving: candidate scoring equals scoring the expanded batch; the exported entry points
(dynamic B, N, T) equal eager on shapes other than the ones they were traced with; a
training checkpoint loads back; the tensor file format round-trips.

The AOTInductor package and the C++ runner are checked end to end by the ctest
``serving_export_runner`` (csrc/serving/check_runner.py): compiling a package takes a
minute or more here, so it runs once per CI run, there.
"""
import pytest
import torch

from interest_kernels.data import Batch
from interest_kernels.export import (
    CandidateScoringModule,
    ScoringModule,
    export_programs,
    load_checkpoint_model,
    read_tensors,
    write_tensors,
)
from interest_kernels.models import DIEN, DIN, DMIN
from interest_kernels.train import TrainConfig, run
from test_models import TINY, _batch, _spec

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATE_CASES = [
    pytest.param(DIN, {}, id="din"),
    pytest.param(DIN, {"att_normalization": "softmax", "att_activation": "dice"}, id="din-softmax-dice"),
    pytest.param(DIEN, {}, id="dien-augru"),
    pytest.param(DIEN, {"gru_type": "AIGRU"}, id="dien-aigru"),
    pytest.param(DIEN, {"gru_type": "GRU"}, id="dien-gru"),
    pytest.param(DMIN, {}, id="dmin"),
]


def _model(cls, extra=None, backend="fused"):
    torch.manual_seed(0)
    return cls(_spec(), backend=backend, **TINY[cls], **(extra or {})).eval()


def _candidates(users: Batch, n: int, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    item = torch.randint(1, 30, (n,), generator=gen)
    cat = torch.randint(1, 5, (n,), generator=gen)
    user_index = torch.randint(0, users.user.shape[0], (n,), generator=gen)
    return item, cat, user_index


def _expanded(users: Batch, item, cat, user_index) -> Batch:
    return Batch(users.user[user_index], item, cat, users.hist_items[user_index], users.hist_cats[user_index],
                 users.lengths[user_index], users.context[user_index], None)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("cls, extra", CANDIDATE_CASES)
def test_score_candidates_equals_the_expanded_batch(cls, extra, backend):
    model = _model(cls, extra, backend)
    users = _batch(_spec(), b=4)  # lengths 0 and T among them
    item, cat, user_index = _candidates(users, 9)
    with torch.no_grad():
        got = model.score_candidates(users, item, cat, user_index)
        want = model(_expanded(users, item, cat, user_index)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_score_candidates_of_one_user_needs_no_index():
    model = _model(DIN)
    users = _batch(_spec(), b=2)
    one = Batch(*(t[1:2] if t is not None else None for t in users))
    item, cat, _ = _candidates(one, 5)
    with torch.no_grad():
        got = model.score_candidates(one, item, cat)
        want = model.score_candidates(one, item, cat, torch.zeros(5, dtype=torch.int64))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="user_index is required"):
        model.score_candidates(users, item, cat)
    with pytest.raises(ValueError, match="user_index"):
        model.score_candidates(users, item, cat, torch.full((5,), 2))
    with pytest.raises(ValueError, match="cat"):
        model.score_candidates(users, item, cat[:3], torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("cls", [DIN, DIEN, DMIN])
def test_exported_entry_points_are_dynamic_and_match_eager(cls):
    model = _model(cls)
    programs = export_programs(model)
    for rows, steps in ((1, 1), (6, 7)):
        users = Batch(*(t[:rows] for t in _batch(_spec(), b=max(rows, 2), t=steps)))  # row 0: length 0
        score_args = (users.user, users.item, users.cat, users.hist_items, users.hist_cats, users.lengths,
                      users.context)
        item, cat, user_index = _candidates(users, 2 * rows + 1)
        cand_args = (users.user, users.hist_items, users.hist_cats, users.lengths, users.context, item, cat,
                     user_index)
        with torch.no_grad():
            torch.testing.assert_close(programs["score"].module()(*score_args), ScoringModule(model)(*score_args),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(programs["candidates"].module()(*cand_args),
                                       CandidateScoringModule(model)(*cand_args), rtol=1e-5, atol=1e-6)


def test_training_checkpoint_loads_for_export(tmp_path):
    config = TrainConfig(
        model="dmin", epochs=1, max_steps=2, batch_size=32, max_len=6, device="cpu",
        data_kwargs=dict(num_users=40, num_items=30, num_cats=5, train_per_user=2, test_per_user=1, min_len=2),
        model_kwargs=TINY[DMIN],
    )
    path = str(tmp_path / "ck.pt")
    run(config, checkpoint=path, quiet=True, log=lambda *_: None)
    model = load_checkpoint_model(path, "dmin")
    saved = torch.load(path, weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert not model.training
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint_model(path, "din")


def test_tensor_file_round_trip(tmp_path):
    tensors = {"ids": torch.arange(12).reshape(3, 4), "empty": torch.zeros(0, 2, dtype=torch.int64),
               "scores": torch.rand(5), "scalar": torch.tensor(1.5)}
    path = str(tmp_path / "t.bin")
    write_tensors(path, tensors)
    back = read_tensors(path)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        torch.testing.assert_close(back[name], t, rtol=0, atol=0)
    with pytest.raises(TypeError, match="half"):
        write_tensors(path, {"half": torch.zeros(2, dtype=torch.float16)})


def test_packaged_target_attention_equals_the_fused_op():
    from interest_kernels.export import _load_packaged_attention

    if not _load_packaged_attention():
        pytest.skip("the compiled extension (with csrc/serving_ops.cpp) is not built")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 1, 4, generator=gen), torch.randn(2, 1, 5, 4, generator=gen)
    weights = [torch.randn(1, 6, 16, generator=gen), torch.randn(1, 2, 6, generator=gen)]
    biases = [torch.randn(1, 6, generator=gen), torch.randn(1, 2, generator=gen)]
    args = (q, k, torch.tensor([1, 0, 1]), torch.tensor([5, 2]), None, weights, biases,
            torch.randn(1, 2, generator=gen), torch.randn(1, generator=gen))
    for normalization in ("softmax", "none"):
        want = torch.ops.interest_kernels.target_attention_cpu(*args, [], "sigmoid", normalization)
        got = torch.ops.interest_kernels.target_attention_cpu_packaged(*args, None, "sigmoid", normalization)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        torch.library.opcheck(torch.ops.interest_kernels.target_attention_cpu_packaged.default,
                              args + (None, "sigmoid", normalization), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA package needs a GPU")
@pytest.mark.parametrize("cls", [DIN, DIEN, DMIN])
def test_cuda_package_embeds_the_triton_kernels_and_matches_eager(cls, tmp_path):
    """``--device cuda``: the package holds the Triton kernels (no call into this project's
    operators is left in it) and both entry points equal eager on other shapes."""
    import zipfile

    from torch._inductor.package import load_package

    from interest_kernels.export import export_package

    model = _model(cls, {"att_activation": "dice"} if cls is not DMIN else None).cuda()
    path = export_package(model, str(tmp_path / "model.pt2"), "cuda",
                          {"aot_inductor.compile_wrapper_opt_level": "O0"})
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith((".cpp", ".h", ".json")):
                assert b"interest_kernels" not in package.read(name), name
    score, candidates = load_package(path, "score"), load_package(path, "candidates")
    for rows, steps in ((1, 1), (6, 7)):
        users = Batch(*(t[:rows].cuda() for t in _batch(_spec(), b=max(rows, 2), t=steps)))
        score_args = (users.user, users.item, users.cat, users.hist_items, users.hist_cats, users.lengths,
                      users.context)
        item, cat, user_index = (t.cuda() for t in _candidates(users, 2 * rows + 1))
        cand_args = (users.user, users.hist_items, users.hist_cats, users.lengths, users.context, item, cat,
                     user_index)
        with torch.no_grad():
            torch.testing.assert_close(score(*score_args), ScoringModule(model)(*score_args), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(candidates(*cand_args), CandidateScoringModule(model)(*cand_args),
                                       rtol=1e-4, atol=1e-5)
