"""Live progress of a running build from the pipeline's own Beam counters.

Locally, FnApiRunner runs the whole pipeline inside `pipeline.run()` and only hands back its
metrics at the end, so `ProgressFnApiRunner` collects them as it goes: the counters of every
finished bundle, plus the latest progress report of each bundle still running (Beam's
ProcessBundleProgressRequest, asked for every `interval` seconds, in-process or multi-process
workers alike). On a runner whose `run()` returns while the job runs (Dataflow), a thread polls
`result.metrics().query()` instead. Either way `ProgressPrinter` turns the counter totals into one
line per stage, with a rate and, where a total is known, an estimate of the time left.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from apache_beam.runners.portability import portable_metrics
from apache_beam.runners.portability.fn_api_runner import fn_runner

Counters = dict[tuple[str, str], int]  # (namespace, name) -> total over steps and workers


@dataclass(frozen=True)
class Stage:
    label: str                       # what is counted, e.g. "images detected"
    counters: tuple[str, ...]        # "namespace/name" counters summed; "namespace/prefix*" sums those names
    total: tuple[str, ...] = ()      # counters whose sum is this stage's total (when known)


# The build's stages in pipeline order. A stage's total is the count its input stage produced:
# known once that stage has finished reading (the estimate is then honest), approximate before.
STAGES = (
    Stage("images read", ("read_images/images",)),
    # an image the detector rejects (undecodable, no region) is done with too
    Stage("images detected", ("detect/images", "rejected/detect:*"), ("read_images/images",)),
    # --store-images with --detections: images read from --image-root (with --images, detect stores them)
    Stage("images stored", ("store_images/images", "rejected/store_images:*")),
    Stage("records rejected", ("rejected/*",)),
    Stage("sentences read", ("read_text/sentences",)),
    Stage("texts embedded", ("embed/texts",)),
    Stage("queries searched", ("retrieve/queries",)),
    Stage("sentences parsed", ("phrases/sentences",)),
    Stage("phrases linked", ("link/phrases_linked", "link/phrases_unlinked")),
    Stage("samples written", ("shards/samples",), ("detect/images",)),
)


def counter_totals(counter_results) -> Counters:
    """Beam MetricResults of counters -> totals by (namespace, name), summed over steps."""
    totals: Counters = {}
    for result in counter_results:
        # a running Dataflow job's committed values lag its attempted ones; finished, they agree
        value = max(result.committed or 0, result.attempted or 0)
        key = (result.key.metric.namespace, result.key.metric.name)
        totals[key] = totals.get(key, 0) + int(value or 0)
    return totals


def _from_monitoring_infos(infos) -> Counters:
    counters = portable_metrics.from_monitoring_infos(list(infos), user_metrics_only=True)[0]
    totals: Counters = {}
    for key, value in counters.items():
        name = (key.metric.namespace, key.metric.name)
        totals[name] = totals.get(name, 0) + int(value)
    return totals


def _add(into: Counters, more: Counters) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def stage_value(counters: Counters, names: tuple[str, ...]) -> int:
    total = 0
    for name in names:
        namespace, counter = name.split("/", 1)
        if counter.endswith("*"):
            total += sum(v for (ns, n), v in counters.items() if ns == namespace and n.startswith(counter[:-1]))
        else:
            total += counters.get((namespace, counter), 0)
    return total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressPrinter:
    """Renders counter totals as per-stage lines. On a terminal the block is redrawn in place;
    elsewhere (a log file, CI) a plain line per stage that moved is printed each update."""

    def __init__(self, stream=None, stages=STAGES, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.stages = stages
        self.clock = clock
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._start = clock()
        self._idle_until: dict[str, float] = {}  # stage -> the last time it was seen at zero
        self._shown: dict[str, int] = {}
        self._drawn_lines = 0
        self.latest: dict[str, int] = {}  # stage label -> the last value shown (monotone)

    def lines(self, counters: Counters) -> list[str]:
        now = self.clock()
        out = []
        for stage in self.stages:
            # Counters only grow; a progress report can lag a finished bundle's: never show a dip.
            value = max(stage_value(counters, stage.counters), self.latest.get(stage.label, 0))
            self.latest[stage.label] = value
            if value == 0:
                self._idle_until[stage.label] = now
                continue
            # the rate since the stage started: since it was last seen at zero (or the build started)
            since = self._idle_until.get(stage.label, self._start)
            rate = value / (now - since) if now - since > 0.5 else 0.0
            line = f"  {stage.label:<17} {value:>10,}"
            total = stage_value(counters, stage.total) if stage.total else 0
            if total and value < total:
                line += f" of {total:,} ({100 * value / total:.0f}%)"
            if rate:
                line += f"  {rate:,.1f}/s"
                if total and value < total:
                    line += f"  ~{_duration((total - value) / rate)} left"
            out.append(line)
        return out

    def update(self, counters: Counters) -> None:
        lines = self.lines(counters)
        elapsed = _duration(self.clock() - self._start)
        if self.tty:
            block = [f"progress after {elapsed}:"] + lines
            if self._drawn_lines:
                self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # back to the block's start, clear
            self.stream.write("\n".join(block) + "\n")
            self._drawn_lines = len(block)
        else:
            moved = [line for stage, line in zip(self._moving_stages(), lines) if stage]
            if moved:
                self.stream.write(f"progress after {elapsed}:\n" + "\n".join(moved) + "\n")
        self.stream.flush()

    def _moving_stages(self) -> list[bool]:
        """For plain output: which shown stages changed since the last print (one flag per line)."""
        flags = []
        for stage in self.stages:
            value = self.latest.get(stage.label, 0)
            if value:
                flags.append(self._shown.get(stage.label) != value)
                self._shown[stage.label] = value
        return flags


class ProgressFnApiRunner(fn_runner.FnApiRunner):
    """FnApiRunner that keeps a running total of the user counters while the pipeline runs."""

    def __init__(self, interval: float = 2.0, **kwargs):
        super().__init__(progress_request_frequency=interval, **kwargs)
        self._lock = threading.Lock()
        self._finished: Counters = {}
        self._running: dict[str, Counters] = {}  # bundle instruction id -> latest progress report
        self._ended: set[str] = set()  # bundles whose counters are final: a late report is ignored

    def counters(self) -> Counters:
        with self._lock:
            totals = dict(self._finished)
            for running in self._running.values():
                _add(totals, running)
        return totals

    def _on_progress(self, instruction_id: str, response) -> None:
        counters = _from_monitoring_infos(response.monitoring_infos)
        with self._lock:
            if instruction_id not in self._ended:  # else it would count twice beside the finished bundle
                self._running[instruction_id] = counters

    def _on_bundle_end(self, instruction_id: str) -> None:
        with self._lock:
            self._ended.add(instruction_id)
            self._running.pop(instruction_id, None)

    def _execute_bundle(self, runner_execution_context, bundle_context_manager, bundle_input):
        result = super()._execute_bundle(runner_execution_context, bundle_context_manager, bundle_input)
        try:
            finished = _from_monitoring_infos(result.process_bundle.monitoring_infos)
        except Exception:  # progress is a display: a changed result shape must never fail the bundle
            return result
        with self._lock:
            _add(self._finished, finished)
        return result

    def run_pipeline(self, pipeline, options):
        runner = self

        class _Requester(fn_runner.ProgressRequester):
            def __init__(self, worker_handler, instruction_id, frequency, callback=None):
                super().__init__(worker_handler, instruction_id, frequency,
                                 callback=lambda response: runner._on_progress(instruction_id, response))

            def stop(self):  # the bundle is done: its final counters come with its result
                super().stop()
                runner._on_bundle_end(self._instruction_id)

        # BundleManager looks ProgressRequester up in its module at each bundle: route its reports here
        # for this run (a local run; other runners never reach this class).
        original = fn_runner.ProgressRequester
        fn_runner.ProgressRequester = _Requester
        try:
            return super().run_pipeline(pipeline, options)
        finally:
            fn_runner.ProgressRequester = original


def live_progress_supported() -> bool:
    """Whether this Beam has the FnApiRunner internals ProgressFnApiRunner hooks into (checked
    against apache-beam 2.77; another version may differ): otherwise a local run shows only the
    final totals, rather than failing."""
    import inspect
    try:
        bundle = list(inspect.signature(fn_runner.FnApiRunner._execute_bundle).parameters)
        requester = list(inspect.signature(fn_runner.ProgressRequester.__init__).parameters)
        return (bundle[1:] == ["runner_execution_context", "bundle_context_manager", "bundle_input"]
                and requester[1:5] == ["worker_handler", "instruction_id", "frequency", "callback"]
                and hasattr(fn_runner.ProgressRequester, "stop"))
    except (AttributeError, TypeError, ValueError):
        return False


def run_with_progress(pipeline, printer: ProgressPrinter | None = None, interval: float = 2.0):
    """Run `pipeline` to completion, printing per-stage progress every `interval` seconds.
    Returns the PipelineResult."""
    printer = printer or ProgressPrinter()
    done = threading.Event()
    source = {}

    if isinstance(pipeline.runner, fn_runner.FnApiRunner) and live_progress_supported():
        runner = ProgressFnApiRunner(interval=min(interval, 2.0))
        pipeline.runner = runner
        source["counters"] = runner.counters

    def poll():
        while not done.wait(interval):
            read = source.get("counters")
            if read is not None:
                try:
                    printer.update(read())
                except Exception:  # a metrics read that fails now may work next time; never stop the run
                    pass

    thread = threading.Thread(target=poll, name="build-progress", daemon=True)
    thread.start()
    try:
        result = pipeline.run()
        if "counters" not in source:  # the job runs remotely: poll its metrics while waiting
            source["counters"] = lambda: counter_totals(result.metrics().query()["counters"])
        result.wait_until_finish()
    finally:
        done.set()
        thread.join()
    try:
        printer.update(counter_totals(result.metrics().query()["counters"]))  # the final totals
    except Exception:
        pass
    return result
