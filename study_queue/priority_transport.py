"""kombu's filesystem transport, asking a worker's queues in the worker's order.

kombu's virtual transports take turns between the queues a worker consumes (round robin,
``kombu.utils.scheduling.FairCycle``), so ``inference-urgent`` would only get every other
turn. Here each poll starts again at the first queue: an urgent study waiting is always
taken before a normal one, which is what the Redis transport does with
``queue_order_strategy = "priority"``. Nothing else about the transport changes.
"""
from __future__ import annotations

from queue import Empty

from kombu.transport import filesystem
from kombu.utils.scheduling import FairCycle


class _FirstQueueFirst(FairCycle):
    def get(self, callback, **kwargs):
        self.pos = 0
        return super().get(callback, **kwargs)


class PriorityChannel(filesystem.Channel):
    def _reset_cycle(self):
        self._cycle = _FirstQueueFirst(self._get_and_deliver, self._active_queues, Empty)


class PriorityFilesystemTransport(filesystem.Transport):
    Channel = PriorityChannel
