"""The benchmarks' one timing helper: milliseconds per image, wall clock and process CPU, after warm-up.

The job's callbacks, ``runtimes`` and the ablation all time through :class:`PerImageTimes`, so
"ms/image" means the same everywhere: ``time.perf_counter`` around a call, divided by the images
it handled, the first ``warmup_images`` images left out, the median reported. Process CPU time is
kept beside the wall clock because other processes on a shared CPU slow only the wall clock.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any


class PerImageTimes:
    """Per-image milliseconds of timed calls, leaving out the first ``warmup_images`` images."""

    def __init__(self, warmup_images: int = 0) -> None:
        self.warmup_images = warmup_images
        self.wall_ms: list[float] = []
        self.cpu_ms: list[float] = []
        self.seconds = 0.0  # every timed call, warm-up included
        self.images = 0
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self, images: int = 1) -> float:
        """End the call begun by :meth:`start`; returns its seconds."""
        wall = time.perf_counter() - self._started[0]
        cpu = time.process_time() - self._started[1]
        self.seconds += wall
        if self.images >= self.warmup_images:
            self.wall_ms.append(1000 * wall / images)
            self.cpu_ms.append(1000 * cpu / images)
        self.images += images
        return wall

    def call(self, function: Callable[[Any], Any], argument: Any, images: int = 1) -> Any:  # noqa: ANN401
        self.start()
        result = function(argument)
        self.stop(images)
        return result

    @property
    def median_ms(self) -> float:
        return statistics.median(self.wall_ms) if self.wall_ms else float("nan")

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    def __len__(self) -> int:
        return len(self.wall_ms)
