"""Predict a file or a folder into outputs that mirror it, without ever destroying data (``experiments.predict``).

:func:`predict_files` plans one output per case (:func:`plan`: a file for a file, ``<output>/<case>.nii.gz`` or
``.png`` for a folder, nnU-Net's naming), checks everything before the first forward pass (:func:`check_outputs`:
no output may be or resolve to an input, through symlinks or ``..``; no existing output is replaced without
``overwrite``; the output folder must be writable; every case of a folder is read and checked), then predicts case
by case with progress bars (per folder and per case, with an ETA, on stderr), writing each output atomically. A run
that is interrupted and restarted with ``resume`` skips the cases whose outputs exist (an atomic write means an
existing output is complete). With ``labels`` the written predictions are scored (:mod:`.scoring`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_selfreg.data.contract import DataError
from lightning_selfreg.segmentation.inference import PredictionError
from lightning_selfreg.segmentation.inputs import (
    CaseSource,
    find_cases,
    read_case,
    write_prediction,
    write_probabilities,
)
from lightning_selfreg.segmentation.predictor import Predictor
from lightning_selfreg.segmentation.scoring import check_label, find_label, score_cases, write_scores
from lightning_selfreg.utils.files import remove_orphaned_temp_files

__all__ = ["FilesResult", "Job", "check_outputs", "plan", "predict_files"]

VOLUME_OUTPUTS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Job:
    """One case and where its outputs go."""

    source: CaseSource
    output: Path
    probabilities: Path | None = None
    label: Path | None = None

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The files this job writes."""
        return (self.output,) if self.probabilities is None else (self.output, self.probabilities)


@dataclass
class FilesResult:
    """What :func:`predict_files` did: the written and the skipped outputs, and the scores (with ``labels``)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    scores: dict[str, Any] | None = None
    score_files: tuple[Path, ...] = ()


def _probabilities_path(output: Path) -> Path:
    name = output.name
    for ending in (*VOLUME_OUTPUTS, ".png"):
        if name.lower().endswith(ending):
            return output.with_name(name[: -len(ending)] + ".npz")
    return output.with_name(name + ".npz")


def plan(input: Path, output: Path, sources: Sequence[CaseSource], probabilities: bool = False,
         labels: Path | None = None) -> tuple[list[Job], bool]:
    """One :class:`Job` per case; returns ``(jobs, single)`` (``single``: ``output`` is a file).

    A single input file (or a single DICOM series with an ``output`` ending in ``.nii.gz``) is written to
    ``output`` itself, or into it as ``<case><suffix>`` when ``output`` is an existing folder; a folder is written
    into the folder ``output``.

    Raises:
        PredictionError: An output file name whose ending does not fit the input, or a label missing in ``labels``.
    """
    input, output = Path(input), Path(output)
    name = output.name.lower()
    suffix = sources[0].suffix
    single = len(sources) == 1 and (input.is_file() or name.endswith(VOLUME_OUTPUTS)) and not output.is_dir()
    if single:
        ok = name.endswith(VOLUME_OUTPUTS) if suffix == ".nii.gz" else name.endswith(suffix)
        if not ok:
            expected = ".nii.gz (or .nii)" if suffix == ".nii.gz" else suffix
            raise PredictionError(f"--output {output}: expected a {expected} file for {sources[0].display} (or an "
                                  f"existing folder), found another ending")
        outputs = [output]
    else:
        if output.is_file():
            raise PredictionError(f"--output {output}: expected a folder for the {len(sources)} case(s) of {input}, "
                                  "found a file")
        outputs = [output / f"{s.name}{s.suffix}" for s in sources]
    jobs = []
    missing = []
    for source, out in zip(sources, outputs, strict=True):
        label = None
        if labels is not None:
            label = find_label(labels, source.name, source.suffix)
            if label is None:
                missing.append(source.name)
        jobs.append(Job(source, out, _probabilities_path(out) if probabilities else None, label))
    if labels is not None and not labels.exists():
        raise PredictionError(f"--labels {labels}: not found")
    if missing:
        raise PredictionError(f"--labels {labels}: expected a label for every case (<case>{suffix}), found none for "
                              f"{len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return jobs, single


def _inputs_of(jobs: Sequence[Job]) -> dict[Path, str]:
    """Every file the run reads (images, DICOM series files, reference labels), resolved, with what it is."""
    files = {}
    for job in jobs:
        for path in job.source.paths:
            files[path.resolve()] = "input file"
            if path.is_dir():  # a DICOM series folder: every file in it
                files.update((p.resolve(), "input file") for p in path.iterdir())
        if job.label is not None:
            files[job.label.resolve()] = "reference label"
    return files


def _writable_folder(folder: Path, output: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PredictionError(f"--output {output}: expected a folder to write into, found the file {probe}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PredictionError(f"--output {output}: expected a writable folder, found {probe} not writable "
                              "(permission denied)")


def check_outputs(jobs: Sequence[Job], input: Path, output: Path, single: bool, overwrite: bool = False,
                  resume: bool = False, extra: Sequence[Path] = ()) -> list[Job]:
    """Check that the outputs destroy nothing; returns the jobs to run (``resume``: without the finished ones).

    Args:
        jobs: From :func:`plan`.
        input: The ``--input`` path.
        output: The ``--output`` path.
        single: Whether ``output`` is a file.
        overwrite: Replace existing outputs.
        resume: Skip the jobs whose outputs all exist.
        extra: Other files the run writes (the scores).

    Raises:
        PredictionError: An output that is or resolves to an input (or a folder output that is the input folder), an
            existing output without ``overwrite`` / ``resume``, or an output folder that cannot be written.
    """
    inputs = _inputs_of(jobs)
    folder = output.parent if single else output
    if Path(input).is_dir() and folder.resolve() == Path(input).resolve():
        raise PredictionError(f"--output {output}: expected a folder other than the input folder {input} (the "
                              "predictions would be mixed with the images), found the same folder")
    for path in [p for job in jobs for p in job.outputs] + list(extra):
        if path.resolve() in inputs:
            raise PredictionError(f"--output {path}: expected a path that is not an input, found that it resolves to "
                                  f"the {inputs[path.resolve()]} {path.resolve()}; choose another --output")
    _writable_folder(folder, output)
    done = [job for job in jobs if all(p.exists() for p in job.outputs)]
    existing = [p for job in jobs for p in job.outputs if p.exists()] + [p for p in extra if p.exists()]
    if resume:
        return [job for job in jobs if job not in done]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PredictionError(f"--output {existing[0]}: exists{more}; pass --overwrite to replace, or --continue to "
                              "skip the cases already written")
    return list(jobs)


def _bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def predict_files(predictor: Predictor, input: str | os.PathLike, output: str | os.PathLike,
                  overwrite: bool = False, resume: bool = False, probabilities: bool = False,
                  labels: str | os.PathLike | None = None, progress: bool = True,
                  on_case: Callable[[int, int, Path], None] | None = None) -> FilesResult:
    """Segment every case of ``input`` into ``output`` (see the module docstring).

    Args:
        predictor: The :class:`~lightning_selfreg.segmentation.predictor.Predictor`.
        input: A file or a folder (see :mod:`~lightning_selfreg.segmentation.inputs`).
        output: A file for a single case, else a folder.
        overwrite: Replace existing outputs.
        resume: Skip cases whose outputs exist (``--continue``).
        probabilities: Also write ``<case>.npz`` with the float16 class probabilities.
        labels: A folder of reference labels (or one label file): score the predictions.
        progress: Progress bars on stderr (for a terminal; a log file wants ``on_case`` instead).
        on_case: Called as ``on_case(k, n, output)`` after the k-th of the n cases to segment is written, e.g. to
            print one line per case with an ETA where progress bars would fill a log with carriage returns.

    Raises:
        PredictionError: Any bad input or output, before anything is written (one line naming it).
    """
    record = predictor.preprocessing
    input, output = Path(input), Path(output)
    label_path = None if labels is None else Path(labels)
    try:
        sources = find_cases(input, record)
        jobs, single = plan(input, output, sources, probabilities, label_path)
        folder = output.parent if single else output
        prefix = f"{output.name.split('.')[0]}_" if single else ""
        score_files = (folder / f"{prefix}scores.csv", folder / f"{prefix}scores.json") if labels else ()
        todo = check_outputs(jobs, input, output, single, overwrite, resume, score_files)
        cases = {}
        # every case (and its label) is read and checked before the first output is written; a folder's cases are
        # read again when their turn comes, so that only one is held in memory
        checked = jobs if labels is not None else todo  # the scores cover the skipped cases too
        for job in (_bar(iterable=checked, desc="checking inputs", unit="case", leave=False)
                    if progress and len(checked) > 1 else checked):
            case = read_case(job.source, record)
            if job.label is not None:
                check_label(job.label, case, len(predictor.module.class_names) + 1)
            if len(todo) == 1 and job in todo:
                cases[job] = case
    except DataError as err:
        raise PredictionError(str(err)) from err
    remove_orphaned_temp_files(folder, include_own=False)  # of a predict killed mid-write
    result = FilesResult(skipped=[job.output for job in jobs if job not in todo])
    outer = _bar(total=len(todo), desc="cases", unit="case") if progress and len(todo) > 1 else None
    unit = "window" if predictor.module.hparams.spatial_dims == 3 else "slice"
    for k, job in enumerate(todo, 1):
        case = cases.pop(job, None) or read_case(job.source, record)
        inner = _bar(desc=job.source.name, unit=unit, leave=outer is None) if progress else None

        def total(n: int, bar: Any = inner) -> None:
            if bar is not None:
                bar.reset(total=n)

        prediction = predictor.predict_case(case, probabilities, step=None if inner is None else inner.update,
                                            total=total)
        if inner is not None:
            inner.close()
        write_prediction(prediction.labels, case, job.output, record)
        if job.probabilities is not None:
            write_probabilities(prediction.probabilities, job.probabilities, predictor.class_names,
                                case.kind == "image")
        result.written.append(job.output)
        if outer is not None:
            outer.update(1)
        if on_case is not None:
            on_case(k, len(todo), job.output)
    if outer is not None:
        outer.close()
    if labels is not None:
        pairs = [(job.source.name, job.output, job.label) for job in jobs]
        rows, result.scores = score_cases(pairs, predictor.module.class_names)
        result.score_files = write_scores(rows, result.scores, folder, prefix)
    return result
