"""lmms-eval model wrappers: evaluate a VLM with (or without) VideoAnchor on VSI-Bench & co.

Registered through lmms-eval's plugin entry point (group ``lmms_eval.models``, lmms-eval >=
0.6; declared in this package's pyproject.toml), so after ``pip install videoanchor
lmms-eval`` these model names exist::

    lmms-eval --model videoanchor_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,max_num_frames=16,alpha_k=9.5,alpha_v=2.5 \\
        --tasks vsibench --batch_size 1 --output_path results/
    # the baseline: the same command with anchor=False in --model_args

One name per family (``videoanchor_qwen2_vl``, ``videoanchor_qwen2_5_vl``,
``videoanchor_qwen3_vl``, ``videoanchor_internvl``, ``videoanchor_llava_onevision``,
``videoanchor_llava_next_video``) checks that ``pretrained`` is of that family;
``videoanchor`` accepts any supported family.

Model arguments (``--model_args k=v,...``): ``pretrained``; ``anchor`` (True: VideoAnchor,
False: the same model with plain attention); ``alpha_q``, ``alpha_k``, ``alpha_v`` (default:
the family's values in the registry); ``n_clusters`` (24); ``decode`` ("prefill", the paper,
or "all"); ``pca_rank`` (0); ``ssc_max_iter`` (10000); ``label_draws`` (1, the paper's
single label draw; R > 1 averages R draws for seed-stable scores); ``ssc_time_budget``
(seconds per SSC run, default none: SSC runs to eps or the limit; a budget stops it at the
iterate reached, which is NOT the paper's answer); ``ssc_progress`` ("auto", True, False:
a bar on a terminal or log lines, for SSC runs longer than 5 s); ``max_num_frames``
(16, sampled uniformly over the whole video, first and last frame included);
``max_new_tokens`` (default: the task's); ``min_pixels``/``max_pixels`` (Qwen families: the per-frame pixel range of the
video processor); ``device`` ("auto"), ``dtype`` ("auto": bfloat16 on CUDA);
``trust_remote_code``; ``batch_size`` (lmms-eval's ``--batch_size``: consecutive requests
with the same kind of visual input and the same ``max_new_tokens`` are answered in one
left-padded ``generate`` call; SSC runs per sample, so the answers are those of
``batch_size=1``).

An SSC that stops before eps (iteration limit or time budget) is reported: a warning at the
first such request, and at the end of ``generate_until`` how many requests it hit with the
largest residual reached (``ssc_unconverged`` counts them over the wrapper's life).

Documents may hold one video (a file path: VSI-Bench, Video-MME) or a list of images (PIL
images, arrays or image files: SPAR-Bench's views); the images of one document are one
request, anchored over the image tokens of all views together.

Data parallelism: under ``accelerate launch`` (or torchrun) each process reads its rank from
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, exposes them as ``rank``/``world_size`` (lmms-eval
hands each rank its own share of the documents) and, with ``device=auto`` on a CUDA machine,
loads the model on ``cuda:LOCAL_RANK``.

The lmms-eval base class is imported only when lmms-eval asks for a class
(``module.__getattr__``), so importing this module never needs lmms-eval.

Request contract (lmms-eval ``simple`` models, read from lmms-eval 0.5-0.7.3 sources):
``Instance.args`` of a ``generate_until`` request is ``(context, gen_kwargs, doc_to_visual,
doc_id, task, split)`` and the visuals are ``doc_to_visual(self.task_dict[task][split][doc_id])``
(VSI-Bench: ``[video_path]``; SPAR-Bench: the document's list of images). ``generate_until``
returns one string per request, in order.
"""

from __future__ import annotations

import math
import numbers
import warnings

from videoanchor.anchor.options import DEFAULTS as SSC

__all__ = ["MODEL_NAMES", "VideoAnchorLMMCore", "model_manifests"]

# lmms-eval model name -> (registry family or None for any, default checkpoint or None).
MODEL_NAMES: dict[str, tuple[str | None, str | None]] = {
    "videoanchor": (None, None),
    "videoanchor_qwen2_vl": ("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct"),
    "videoanchor_qwen2_5_vl": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "videoanchor_qwen3_vl": ("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct"),
    "videoanchor_internvl": ("internvl", None),
    "videoanchor_llava_onevision": ("llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    "videoanchor_llava_next_video": ("llava_next_video", "llava-hf/LLaVA-NeXT-Video-7B-hf"),
}

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _class_name(model_name: str) -> str:
    return "".join(part.capitalize() for part in model_name.split("_")) + "LMM"


_CLASS_TO_MODEL = {_class_name(name): name for name in MODEL_NAMES}


def model_manifests():
    """The ``lmms_eval.models`` entry point: one ModelManifest per name in MODEL_NAMES."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=f"{__name__}.{_class_name(name)}")
        for name in MODEL_NAMES
    ]


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}: expected True or False, got {value!r}")


def _as_float(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}") from None
    if out != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if out < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {out}")
    return out


def _cut(text: str, until) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (accelerate launch and
    torchrun set RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) for a single process."""
    import os

    def read(name, default):
        value = os.environ.get(name)
        try:
            return int(value) if value not in (None, "") else default
        except ValueError:
            raise ValueError(f"environment {name}: expected an integer, got {value!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
            f"WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


def _rank_device(device, local_rank: int, world_size: int, cuda_available: bool) -> str:
    """The device of this process: with several processes and a CUDA machine, "auto" is the
    process's own GPU (``cuda:LOCAL_RANK``), so ranks never share one."""
    if device not in (None, "auto"):
        return str(device)
    if world_size > 1 and cuda_available:
        return f"cuda:{local_rank}"
    return "auto"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VideoAnchorLMMCore:
    """The wrapper's logic, independent of lmms-eval (the registered classes add its base).

    Attributes after construction: ``model``, ``processor``, ``handle`` (the model's
    :class:`~videoanchor.integrations.transformers.AnchorHandle`, whose ``config`` holds the anchoring
    settings in force), ``family`` (``config.model_type``), ``task_dict`` (filled by lmms-eval).
    """

    is_simple = True
    expected_family: str | None = None
    default_pretrained: str | None = None

    def __init__(
        self,
        pretrained: str | None = None,
        anchor=True,
        alpha_q=None,
        alpha_k=None,
        alpha_v=None,
        n_clusters=SSC.n_clusters,
        decode: str = "prefill",
        pca_rank=SSC.pca_rank,
        ssc_max_iter=SSC.max_iter,
        ssc_time_budget=None,
        ssc_progress="auto",
        label_draws=SSC.label_draws,
        max_num_frames=16,
        max_new_tokens=None,
        min_pixels=None,
        max_pixels=None,
        device: str | None = "auto",
        dtype: str = "auto",
        trust_remote_code=False,
        batch_size=1,
        max_batch_size=None,
        cache=True,
        cache_dir=None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"unexpected model_args {sorted(kwargs)}; expected some of: pretrained, anchor, "
                "alpha_q, alpha_k, alpha_v, n_clusters, decode, pca_rank, ssc_max_iter, "
                "ssc_time_budget, ssc_progress, label_draws, max_num_frames, max_new_tokens, "
                "min_pixels, max_pixels, device, dtype, trust_remote_code, batch_size, cache, "
                "cache_dir"
            )
        if not hasattr(self, "task_dict"):
            self.task_dict = {}
        # Data parallelism (accelerate launch / torchrun): each process is one rank; lmms-eval
        # gives each rank its share of the documents through ``rank``/``world_size``.
        self._rank, self._world_size, self._local_rank = _distributed()
        pretrained = pretrained or self.default_pretrained
        if not pretrained:
            raise ValueError("pretrained: expected a model id or directory, got none")
        if batch_size in (None, "auto"):
            self._batch_size = 1
        else:
            self._batch_size = _as_int(batch_size, "batch_size", 1)
        self.anchor = _as_bool(anchor, "anchor")
        if self.anchor:  # the SSC kernel compiled in the background while the model loads
            from videoanchor.anchor.solvers import precompile

            precompile.start("lmms_eval")
        self.max_num_frames = _as_int(max_num_frames, "max_num_frames", 1)
        self.max_new_tokens = (
            None if max_new_tokens is None else _as_int(max_new_tokens, "max_new_tokens", 1)
        )
        trust_remote_code = _as_bool(trust_remote_code, "trust_remote_code")

        from videoanchor.integrations.transformers.configuring import check_options
        from videoanchor.pipeline import PipelineError, check_load_options, check_model, load_vlm

        # Every option is checked here, before the config or the weights are read.
        opts = {
            "enabled": self.anchor,
            "n_clusters": _as_int(n_clusters, "n_clusters", 1),
            "decode": decode,
            "pca_rank": _as_int(pca_rank, "pca_rank", 0),
            "max_iter": _as_int(ssc_max_iter, "ssc_max_iter", 1),
            "label_draws": _as_int(label_draws, "label_draws", 1),
            "ssc_time_budget": _as_float(ssc_time_budget, "ssc_time_budget"),
            "ssc_progress": ssc_progress
            if ssc_progress == "auto"
            else _as_bool(ssc_progress, "ssc_progress"),
        }
        for name, value in (("alpha_q", alpha_q), ("alpha_k", alpha_k), ("alpha_v", alpha_v)):
            value = _as_float(value, name)
            if value is not None:
                opts[name] = value
        check_options(**opts)
        pixel_range = {}
        if min_pixels is not None:
            pixel_range["shortest_edge"] = _as_int(min_pixels, "min_pixels", 1)
        if max_pixels is not None:
            pixel_range["longest_edge"] = _as_int(max_pixels, "max_pixels", 1)
        load_device = _rank_device(device, self._local_rank, self._world_size, _cuda_available())
        try:
            check_load_options(load_device, dtype)
        except PipelineError as err:
            raise ValueError(str(err)) from err

        try:
            config = check_model(pretrained, trust_remote_code=trust_remote_code)
        except PipelineError as err:
            raise ValueError(str(err)) from err
        self.family = config.model_type
        if self.expected_family is not None and self.family != self.expected_family:
            raise ValueError(
                f"pretrained={pretrained!r} is a {self.family!r} model; this lmms-eval model "
                f"name expects {self.expected_family!r} (use --model videoanchor for any family)"
            )
        self.processor_kwargs = {}
        if min_pixels is not None or max_pixels is not None:
            if self.family not in _QWEN:
                raise ValueError(
                    f"min_pixels/max_pixels: only the Qwen families take a pixel range, "
                    f"this is {self.family!r}"
                )
            self.processor_kwargs["size"] = pixel_range
        try:
            self.model, self.processor, handle = load_vlm(
                pretrained,
                device=load_device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
        except PipelineError as err:
            raise ValueError(str(err)) from err

        import videoanchor

        self.handle = videoanchor.configure(self.model, **opts)
        # Vision features, SSC and labels on disk: a re-run with other alphas skips them.
        self.cache = None
        if _as_bool(cache, "cache"):
            from videoanchor.integrations.transformers.cache import (
                AnchorCache,
                default_cache_dir,
                model_fingerprint,
            )

            root = cache_dir or default_cache_dir()
            self.cache = AnchorCache(root, model_key=model_fingerprint(self.model))
            self.handle.cache = self.cache
        self.pretrained = pretrained
        self._warned: set[str] = set()
        self.ssc_unconverged = 0  # requests whose SSC stopped before eps
        self._unconverged_now: list = []

    # lmms-eval reads these
    @property
    def rank(self):
        """This process's rank (from ``RANK``; 0 without a launcher)."""
        return self._rank

    @property
    def world_size(self):
        """Number of evaluation processes (from ``WORLD_SIZE``; 1 without a launcher)."""
        return self._world_size

    @property
    def batch_size(self):
        """Requests answered per ``generate`` call (lmms-eval's ``--batch_size``)."""
        return self._batch_size

    @property
    def device(self):
        """The device of the model's parameters."""
        return self.model.device

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _visual(self, visuals, doc_id, task):
        """``("video", path)`` or ``("images", [views])`` from a document's visuals."""
        import os

        from videoanchor.pipeline import IMAGE_SUFFIXES, PipelineError, read_images

        if visuals is None:
            raise ValueError(
                f"{task} doc {doc_id}: no visual input; this wrapper answers about a video or "
                "several images"
            )
        items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

        def is_path(v):
            return isinstance(v, str) or hasattr(v, "__fspath__")

        def is_image(v):
            if is_path(v):
                return os.fspath(v).lower().endswith(IMAGE_SUFFIXES)
            return (hasattr(v, "convert") and hasattr(v, "size")) or (
                hasattr(v, "ndim") and getattr(v, "ndim", 0) == 3
            )

        if len(items) == 1 and is_path(items[0]) and not is_image(items[0]):
            return "video", os.fspath(items[0])
        if items and all(is_image(v) for v in items):
            try:
                views = [read_images([v])[0] if is_path(v) else v for v in items]
            except PipelineError as err:
                raise ValueError(f"{task} doc {doc_id}: {err}") from err
            return "images", views
        kinds = sorted({type(v).__name__ for v in items})
        raise ValueError(
            f"{task} doc {doc_id}: expected exactly one video file path or a list of images "
            f"(PIL images, arrays or image files), got {len(items)} visual(s) of type {kinds}"
        )

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        """The answer length of one request; checks its gen_kwargs (before any video is read):
        numbers may come as numbers or as the strings a task's YAML or --gen_kwargs gives."""
        temperature = _as_float(gen_kwargs.get("temperature"), "gen_kwargs['temperature']") or 0
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(
                f"gen_kwargs['temperature']: expected a finite number >= 0, got "
                f"{gen_kwargs.get('temperature')!r}"
            )
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is not None:
            do_sample = _as_bool(do_sample, "gen_kwargs['do_sample']")
        beams = gen_kwargs.get("num_beams")
        beams = 1 if beams is None else _as_int(beams, "gen_kwargs['num_beams']", 1)
        length = gen_kwargs.get("max_new_tokens")
        length = 128 if length is None else _as_int(length, "gen_kwargs['max_new_tokens']", 1)
        if temperature > 0 or do_sample:
            self._warn_once(
                "sampling",
                "videoanchor lmms-eval wrapper: the task asks for sampling; decoding greedily "
                "(do_sample=False, num_beams=1) as in the paper",
            )
        if beams != 1:
            self._warn_once("beams", "videoanchor lmms-eval wrapper: num_beams ignored, using 1")
        return self.max_new_tokens or length

    @staticmethod
    def _until(gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until")
        if until is None:
            return []
        if isinstance(until, str):
            return [until]
        if not isinstance(until, (list, tuple)):
            raise ValueError(
                f"gen_kwargs['until']: expected a str or list, got {type(until).__name__}"
            )
        return list(until)

    def answer_batch(self, contexts, visuals, max_new_tokens: int) -> list[str]:
        """One left-padded batch: ``visuals`` are all ``("video", path)`` or all
        ``("images", views)``; greedy decoding in one ``generate`` call, SSC per sample."""
        from videoanchor.pipeline import generate_answers, image_batch_inputs, video_batch_inputs
        from videoanchor.video import read_video_frames

        kinds = {kind for kind, _ in visuals}
        if len(kinds) != 1:
            raise ValueError(f"expected one kind of visual input per batch, got {sorted(kinds)}")
        opts = dict(device=self.model.device, dtype=self.model.dtype, **self.processor_kwargs)
        if kinds == {"video"}:
            videos = [
                read_video_frames(path, self.max_num_frames, progress=False) for _, path in visuals
            ]
            build, samples = video_batch_inputs, videos
        else:
            build, samples = image_batch_inputs, [v for _, v in visuals]
        if self.cache is None:
            inputs = build(self.processor, samples, list(contexts), **opts)
        else:  # each prompt's vision features from the cache, then one left-padded batch
            from videoanchor.integrations.transformers.cache import batch_prompts

            inputs = batch_prompts(
                [self.cache.encode(self.model, build(self.processor, [s], [c], **opts))
                 for s, c in zip(samples, contexts, strict=True)],
                self.processor.tokenizer.pad_token_id,
            )  # fmt: skip
        from videoanchor.anchor.progress import SSCConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SSCConvergenceWarning)  # reported below, once
            answers, timings = generate_answers(
                self.model, self.processor, inputs, self.handle,
                max_new_tokens=max_new_tokens, progress=False,
            )  # fmt: skip
        bad = [r for r in timings.ssc_runs if r is not None and not r.converged]
        if bad:
            self.ssc_unconverged += len(bad)
            self._unconverged_now += bad
            self._warn_once(
                "ssc-unconverged",
                f"videoanchor lmms-eval wrapper: {bad[0].message()} (further requests are "
                "counted and summarised at the end)",
            )
        return answers

    def answer(self, context: str, video_path: str, gen_kwargs: dict | None = None) -> str:
        """One request about one video: sample it, run the model (greedy), cut at the stops."""
        gen_kwargs = dict(gen_kwargs or {})
        until = self._until(gen_kwargs)
        text = self.answer_batch(
            [context], [("video", video_path)], self._max_new_tokens(gen_kwargs)
        )[0]
        return _cut(text, until)

    def generate_until(self, requests) -> list[str]:
        """Answers in request order. Consecutive requests with the same kind of visual input
        and the same ``max_new_tokens`` are answered together, ``batch_size`` at a time."""
        from tqdm.auto import tqdm

        parsed = []
        for request in requests:
            args = request.args
            if len(args) != 6:
                raise ValueError(
                    "expected generate_until request args (context, gen_kwargs, doc_to_visual, "
                    f"doc_id, task, split), got a tuple of {len(args)}"
                )
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            gen_kwargs = dict(gen_kwargs or {})
            length = self._max_new_tokens(gen_kwargs)  # checked before the visual is read
            visual = self._visual(doc_to_visual(self.task_dict[task][split][doc_id]), doc_id, task)
            key = (visual[0], length)
            parsed.append((context, gen_kwargs, visual, key))
        out: list[str] = []
        self._unconverged_now = []
        bar = tqdm(total=len(parsed), desc="videoanchor", disable=self.rank != 0)
        start = 0
        while start < len(parsed):
            stop = start + 1
            while (
                stop < len(parsed)
                and stop - start < self._batch_size
                and parsed[stop][3] == parsed[start][3]
            ):
                stop += 1
            chunk = parsed[start:stop]
            texts = self.answer_batch(
                [c[0] for c in chunk], [c[2] for c in chunk], max_new_tokens=chunk[0][3][1]
            )
            hook = getattr(self, "cache_hook", None)
            for (context, gen_kwargs, _, _), text in zip(chunk, texts, strict=True):
                text = _cut(text, self._until(gen_kwargs))
                if hook is not None:
                    hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            bar.update(len(chunk))
            start = stop
        bar.close()
        if self._unconverged_now:
            runs = self._unconverged_now
            worst = max(runs, key=lambda r: r.residual / max(r.eps, 1e-300))
            budget = sum(r.stopped_by_budget for r in runs)
            warnings.warn(
                f"videoanchor lmms-eval wrapper: SSC stopped before eps on {len(runs)} of "
                f"{len(parsed)} requests ({budget} by the time budget, {len(runs) - budget} at "
                f"the iteration limit max_iter={worst.max_iter}); largest residual "
                f"{worst.residual:.3g} vs eps {worst.eps:.3g}. Their scores are not the "
                "paper's converged ones; raise ssc_max_iter (or drop ssc_time_budget)",
                stacklevel=2,
            )
        return out

    def loglikelihood(self, requests):
        """Not implemented: raises NotImplementedError (the paper's benchmarks generate)."""
        raise NotImplementedError(
            "videoanchor lmms-eval wrapper: loglikelihood is not implemented (VSI-Bench and the "
            "paper's benchmarks use generate_until)"
        )

    def generate_until_multi_round(self, requests):
        """Not implemented: raises NotImplementedError."""
        raise NotImplementedError(
            "videoanchor lmms-eval wrapper: multi-round generation is not implemented"
        )


# (class name, lmms_eval's ``lmms`` base class) -> the class built on it: a class follows the
# lmms_eval that is imported when it is asked for (a reloaded or stand-in lmms_eval gets
# classes of its own).
_CLASSES: dict[tuple[str, type], type] = {}


def _build(class_name: str, lmms: type) -> type:
    family, default = MODEL_NAMES[_CLASS_TO_MODEL[class_name]]
    cls = type(
        class_name,
        (VideoAnchorLMMCore, lmms),
        {
            "__module__": __name__,
            "__doc__": f"lmms-eval model '{_CLASS_TO_MODEL[class_name]}' (VideoAnchor).",
            "is_simple": True,
            "expected_family": family,
            "default_pretrained": default,
        },
    )
    return cls


def __getattr__(name: str):
    if name in _CLASS_TO_MODEL:
        from lmms_eval.api.model import lmms

        key = (name, lmms)
        if key not in _CLASSES:
            _CLASSES[key] = _build(name, lmms)
        return _CLASSES[key]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
