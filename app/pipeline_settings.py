"""What the whole job is asked to do: the conversion's settings plus the pipeline's own, frozen,
each default held once (``lungedge pipeline`` and ``lungedge demo`` take their options' defaults
and help texts from the fields here and in ``convert.settings``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Tuple

from lungedge.convert.settings import ConvertSettings


@dataclass(frozen=True)
class PipelineSettings:
    """How ``lungedge.pipeline.run_pipeline`` trains, converts, benchmarks and judges.

    Attributes:
        convert: the conversion (variants, test data, calibration, bias correction, heat maps...),
            as ``lungedge convert`` does it; its ``out_dir`` is not used (files go to the run folder).
        bench_runs: timed runs per model and thread count.
        bench_threads: interpreter thread counts to benchmark.
        gate: a failing quantisation gate fails the pipeline (exit 1); False only reports it.
        resume: continue an interrupted pipeline: training goes on from its last epoch checkpoint
            (a complete run is kept as it is); the later stages run again.
    """

    convert: ConvertSettings = field(default_factory=ConvertSettings)
    bench_runs: int = field(default=30, metadata={"help": "Timed runs per model and thread count."})
    bench_threads: Tuple[int, ...] = field(default=(1, 2), metadata={"help": "Interpreter thread counts to "
                                                                             "benchmark (comma-separated)."})
    gate: bool = field(default=True, metadata={"help": "Do not fail the pipeline when a quantised variant loses "
                                                       "accuracy."})
    resume: bool = field(default=False, metadata={
        "help": "Continue an interrupted pipeline in --out: training from its last epoch checkpoint "
                "(a complete run is kept), then the later stages again."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "bench_threads", tuple(self.bench_threads))

    def replace(self, **changes: Any) -> "PipelineSettings":
        """A copy with ``changes``: this object's fields, or the conversion's (``calibration_count=16``);
        an unknown name is a TypeError, as for any keyword."""
        own = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in changes.items() if k in own}
        rest = {k: v for k, v in changes.items() if k not in own}
        convert = mine.pop("convert", self.convert)
        return dataclasses.replace(self, convert=convert.replace(**rest) if rest else convert, **mine)
