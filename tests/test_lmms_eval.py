"""The lmms-eval wrapper, offline: a tiny random checkpoint, a video the test writes, and a
hand-made request list.

CI installs the real lmms-eval 0.7.3 (without its heavy dependency list, see .ci/run) and sets
VIDEOANCHOR_REQUIRE_LMMS_EVAL=1, so these tests run against it there (and
tests/test_lmms_eval_real.py runs its CLI). On a machine without it, a minimal stand-in with
the same contract is put in sys.modules:
``lmms_eval.api.model.lmms`` (abstract generate_until / loglikelihood /
generate_until_multi_round, rank/world_size/task_dict set in __init__, create_from_arg_string
parsing "k=v,k=v" with lmms-eval's value rules), ``lmms_eval.api.instance.Instance``
(``args`` is the arguments tuple) and ``lmms_eval.models.registry_v2.ModelManifest``, all
written from lmms-eval 0.7.3's sources. With the real package installed the same tests run
against it.
"""

import abc
import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from test_cli_support import direct_inputs, greedy_answer, moving_shapes, save_tiny_checkpoint

from videoanchor.video import write_video

REPO = Path(__file__).resolve().parents[1]
FRAMES = 8
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


def _fake_lmms_eval():
    """Modules mirroring the parts of lmms-eval 0.7.3 a model plugin touches."""

    def handle_arg_string(arg):  # lmms_eval.utils.handle_arg_string
        if arg.lower() == "true":
            return True
        if arg.lower() == "false":
            return False
        if arg.isnumeric():
            return int(arg)
        try:
            return float(arg)
        except ValueError:
            return arg

    class lmms(abc.ABC):  # noqa: N801 - lmms_eval.api.model.lmms
        is_simple = True

        def __init__(self):
            self._rank = 0
            self._world_size = 1
            self.cache_hook = types.SimpleNamespace(add_partial=lambda *a: None)
            self.task_dict = {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            additional_config = {} if additional_config is None else additional_config
            args = {}
            for item in filter(None, arg_string.strip().split(",")):
                key, value = item.split("=", 1)
                args[key] = handle_arg_string(value)
            extra = {k: v for k, v in additional_config.items() if v is not None}
            return cls(**args, **extra)

    @dataclasses.dataclass
    class Instance:  # lmms_eval.api.instance.Instance
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = dataclasses.field(default_factory=dict)
        resps: list = dataclasses.field(default_factory=list)

        def __post_init__(self):
            self.task_name = self.metadata["task"]
            self.doc_id = self.metadata["doc_id"]
            self.repeats = self.metadata["repeats"]

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:  # lmms_eval.models.registry_v2.ModelManifest
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    mods = {name: types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.instance",
        "lmms_eval.models", "lmms_eval.models.registry_v2")}  # fmt: skip
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return mods


@pytest.fixture
def lmms_eval_modules(monkeypatch):
    if not HAVE_LMMS_EVAL and os.environ.get("VIDEOANCHOR_REQUIRE_LMMS_EVAL") == "1":
        pytest.fail("VIDEOANCHOR_REQUIRE_LMMS_EVAL=1 (CI) but lmms_eval does not import; the "
                    "stand-in is for machines without it")  # fmt: skip
    if not HAVE_LMMS_EVAL:
        for name, module in _fake_lmms_eval().items():
            monkeypatch.setitem(sys.modules, name, module)
    # The wrapper builds its classes on first use, on the lmms_eval imported then (each
    # test's stand-in gets classes of its own).
    torch.set_num_threads(1)  # tiny matmuls: see tests/test_cli.py
    yield
    torch.set_num_threads(_THREADS)


_THREADS = torch.get_num_threads()


def resolve(model_name: str):
    """What lmms-eval's registry does with our entry point's payload for `model_name`."""
    from lmms_eval.api.model import lmms

    from videoanchor.lmms_eval import model_manifests

    manifest = {m.model_id: m for m in model_manifests()}[model_name]
    assert manifest.chat_class_path is None  # a "simple" model
    module_name, cls_name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert isinstance(cls, type) and issubclass(cls, lmms) and cls.is_simple
    return cls


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    save_tiny_checkpoint("qwen2_5_vl", root / "ckpt")
    write_video(root / "a.mp4", moving_shapes(20, 64, 96, seed=0), fps=10)
    write_video(root / "b.mp4", moving_shapes(14, 64, 96, seed=1)[::-1].copy(), fps=10)
    return root


def _requests(assets, gen_kwargs):
    from lmms_eval.api.instance import Instance

    docs = [
        {"video": str(assets / "a.mp4"), "question": "where is the box?"},
        {"video": str(assets / "b.mp4"), "question": "how many discs?"},
        {"video": str(assets / "a.mp4"), "question": "what colour is the disc?"},
    ]
    task_dict = {"toy_vsi": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["video"]]

    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], dict(gen_kwargs), doc_to_visual, i, "toy_vsi", "test"),
            idx=0,
            metadata={"task": "toy_vsi", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    return reqs, task_dict, docs


def _make(model_name, assets, extra=""):
    cls = resolve(model_name)
    args = f"pretrained={assets / 'ckpt'},max_num_frames={FRAMES},n_clusters=4,trust_remote_code=True,device=cpu"
    return cls.create_from_arg_string(
        args + extra, {"batch_size": 1, "max_batch_size": None, "device": None}
    )


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lmms_eval.models"]["videoanchor"]
    assert target == "videoanchor.lmms_eval:model_manifests"
    assert any(dep.startswith("lmms-eval") for dep in project["optional-dependencies"]["eval"])


def test_every_model_name_resolves(lmms_eval_modules):
    from videoanchor.lmms_eval import MODEL_NAMES

    for name, (family, _) in MODEL_NAMES.items():
        cls = resolve(name)
        assert cls.expected_family == family
    assert resolve("videoanchor_qwen2_5_vl").default_pretrained == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_module_imports_without_lmms_eval(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "lmms_eval"] + ["lmms_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of lmms_eval fails
    module = importlib.reload(importlib.import_module("videoanchor.lmms_eval"))
    assert "videoanchor_qwen2_5_vl" in module.MODEL_NAMES
    with pytest.raises(ImportError):
        module.VideoanchorQwen25VlLMM  # noqa: B018 - building the class needs lmms-eval


def test_generate_until_answers_every_request_with_anchoring(lmms_eval_modules, assets):
    lm = _make("videoanchor_qwen2_5_vl", assets, ",alpha_k=40,alpha_v=6,label_draws=2")
    # The anchoring settings reached the model.
    c = lm.handle.config
    assert (c.enabled, c.alpha_k, c.alpha_v, c.n_clusters) == (True, 40.0, 6.0, 4)
    assert c.label_draws == 2
    reqs, task_dict, docs = _requests(assets, {"max_new_tokens": 5, "temperature": 0})
    lm.task_dict = task_dict
    answers = lm.generate_until(reqs)
    assert isinstance(answers, list) and len(answers) == len(reqs)
    assert all(isinstance(a, str) for a in answers)
    assert lm.handle.last_anchored
    for doc, got in zip(docs, answers, strict=True):
        model, processor, handle, inputs = direct_inputs(
            assets / "ckpt", doc["video"], doc["question"], FRAMES,
            n_clusters=4, alpha_k=40.0, alpha_v=6.0, label_draws=2,
        )  # fmt: skip
        assert got == greedy_answer(model, processor, inputs, 5)
        assert handle.last_anchored


def test_anchor_false_is_the_plain_model(lmms_eval_modules, assets):
    lm = _make("videoanchor_qwen2_5_vl", assets, ",alpha_k=40,alpha_v=6,anchor=False")
    assert lm.handle.config.enabled is False
    reqs, task_dict, docs = _requests(assets, {"max_new_tokens": 5})
    lm.task_dict = task_dict
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and not lm.handle.last_anchored
    anchored = []
    for doc, got in zip(docs, answers, strict=True):
        model, processor, _, inputs = direct_inputs(
            assets / "ckpt", doc["video"], doc["question"], FRAMES, enabled=False
        )
        assert got == greedy_answer(model, processor, inputs, 5)
        configure = importlib.import_module("videoanchor").configure
        configure(model, enabled=True, n_clusters=4, alpha_k=40.0, alpha_v=6.0)
        anchored.append(greedy_answer(model, processor, inputs, 5))
    assert anchored != answers  # anchoring changes the answers of this model


def test_until_cuts_the_answer(lmms_eval_modules, assets):
    lm = _make("videoanchor", assets)
    reqs, task_dict, _ = _requests(assets, {"max_new_tokens": 8})
    lm.task_dict = task_dict
    full = lm.generate_until(reqs[:1])[0]
    assert len(full) >= 2
    stop = full[1]
    reqs, _, _ = _requests(assets, {"max_new_tokens": 8, "until": [stop]})
    assert lm.generate_until(reqs[:1])[0] == full.split(stop)[0]


def test_bad_model_args_and_requests(lmms_eval_modules, assets):
    with pytest.raises(ValueError, match="expects 'llava_onevision'"):
        _make("videoanchor_llava_onevision", assets)
    with pytest.raises(TypeError, match="unexpected model_args"):
        _make("videoanchor", assets, ",alpha_x=3")
    with pytest.raises(ValueError, match="batch_size"):
        resolve("videoanchor").create_from_arg_string(
            f"pretrained={assets / 'ckpt'},trust_remote_code=True", {"batch_size": 0}
        )
    with pytest.raises(ValueError, match="anchor"):
        _make("videoanchor", assets, ",anchor=maybe")
    lm = _make("videoanchor", assets)
    reqs, task_dict, _ = _requests(assets, {"max_new_tokens": 2})
    task_dict["toy_vsi"]["test"][0]["video"] = None
    lm.task_dict = task_dict
    with pytest.raises(ValueError, match="one video file path"):
        lm.generate_until(reqs[:1])
    task_dict["toy_vsi"]["test"][0]["video"] = str(assets / "missing.png")
    with pytest.raises(ValueError, match="toy_vsi doc 0: image file not found"):
        lm.generate_until(reqs[:1])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood(reqs)


def _mixed_requests(assets, gen_kwargs):
    """Video and multi-view image documents interleaved, as lmms-eval hands them over."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    frames = moving_shapes(12, 64, 96, seed=2)
    views_a = [Image.fromarray(frames[t]) for t in (0, 5, 11)]
    view_file = assets / "view.png"
    Image.fromarray(frames[7]).resize((80, 56)).save(view_file)
    docs = [
        {"visual": [str(assets / "a.mp4")], "question": "where is the box?"},
        {"visual": [str(assets / "b.mp4")], "question": "how many discs?"},
        {"visual": views_a, "question": "which view shows the disc?"},
        {"visual": [views_a[1], str(view_file)], "question": "same scene?"},
        {"visual": [str(assets / "a.mp4")], "question": "what colour is the disc?"},
    ]
    task_dict = {"toy_mixed": {"test": docs}}

    def doc_to_visual(doc):
        return doc["visual"]

    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], dict(gen_kwargs), doc_to_visual, i, "toy_mixed", "test"),
            idx=0,
            metadata={"task": "toy_mixed", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    return reqs, task_dict, docs


def test_batched_answers_equal_single_requests(lmms_eval_modules, assets):
    single = _make("videoanchor_qwen2_5_vl", assets, ",alpha_k=40,alpha_v=6")
    reqs, task_dict, _ = _mixed_requests(assets, {"max_new_tokens": 5})
    single.task_dict = task_dict
    one_by_one = single.generate_until(reqs)
    assert single.batch_size == 1

    cls = resolve("videoanchor_qwen2_5_vl")
    batched = cls.create_from_arg_string(
        f"pretrained={assets / 'ckpt'},max_num_frames={FRAMES},n_clusters=4,"
        "trust_remote_code=True,device=cpu,alpha_k=40,alpha_v=6",
        {"batch_size": 3, "max_batch_size": None, "device": None},
    )
    assert batched.batch_size == 3
    batched.task_dict = task_dict
    calls = []
    original = batched.answer_batch
    batched.answer_batch = lambda c, v, max_new_tokens: (
        calls.append(len(c)) or original(c, v, max_new_tokens)
    )
    answers = batched.generate_until(reqs)
    assert calls == [2, 2, 1]  # videos, images, video: consecutive same-kind requests batched
    assert answers == one_by_one and all(answers)
    # SSC ran per sample in the last batch (one result per prompt).
    assert len(batched.handle.last_result) == 1
    reqs, _, _ = _mixed_requests(assets, {"max_new_tokens": 5})
    batched.answer_batch = original
    batched.generate_until(reqs[:2])
    assert len(batched.handle.last_result) == 2 and all(
        r is not None for r in batched.handle.last_result
    )


def test_image_documents_match_the_direct_path(lmms_eval_modules, assets):
    import videoanchor
    from videoanchor.pipeline import image_inputs, load_vlm

    lm = _make("videoanchor", assets, ",alpha_k=40,alpha_v=6")
    reqs, task_dict, docs = _mixed_requests(assets, {"max_new_tokens": 6})
    lm.task_dict = task_dict
    got = lm.generate_until(reqs[2:4])
    model, processor, _ = load_vlm(str(assets / "ckpt"), device="cpu", trust_remote_code=True)
    handle = videoanchor.configure(model, n_clusters=4, alpha_k=40.0, alpha_v=6.0)
    from PIL import Image

    for doc, answer in zip(docs[2:4], got, strict=True):
        views = [Image.open(v) if isinstance(v, str) else v for v in doc["visual"]]
        inputs = image_inputs(processor, views, doc["question"])
        assert answer == greedy_answer(model, processor, inputs, 6)
        assert [s.kind for s in handle.last_segments[0]] == ["image"] * len(views)


def test_rank_aware_device_and_data_parallel_split(lmms_eval_modules, assets, monkeypatch):
    from videoanchor import lmms_eval as wrapper

    assert wrapper._rank_device("auto", 1, 2, cuda_available=True) == "cuda:1"
    assert wrapper._rank_device(None, 3, 4, cuda_available=True) == "cuda:3"
    assert wrapper._rank_device("auto", 1, 2, cuda_available=False) == "auto"
    assert wrapper._rank_device("auto", 0, 1, cuda_available=True) == "auto"
    assert wrapper._rank_device("cuda:0", 1, 2, cuda_available=True) == "cuda:0"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    lm = _make("videoanchor", assets)
    assert (lm.rank, lm.world_size) == (1, 2)
    assert str(lm.device) == "cpu"  # device=cpu was asked for
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        _make("videoanchor", assets)


def test_model_args_defaults_run_the_default_solver(lmms_eval_modules, assets, tmp_path,
                                                    monkeypatch):  # fmt: skip
    """Issue 71: with no SSC model arg, the lmms-eval model runs the library's default solver
    (the working sets on the CPU), through its anchor cache, and gives its scores."""
    from test_cli_support import assert_default_solver, record_ssc

    lm = _make("videoanchor_qwen2_5_vl", assets, f",cache_dir={tmp_path}")
    seen = record_ssc(monkeypatch)
    reqs, task_dict, _ = _requests(assets, {"max_new_tokens": 2, "temperature": 0})
    lm.task_dict = task_dict
    lm.generate_until(reqs[:1])
    assert_default_solver(seen, lm.handle.last_result, 4)
