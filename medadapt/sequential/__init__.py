"""Sequential fine-tuning over a stream of tasks (MedSeqFT): stream files and the replay buffer.

The training itself is :mod:`medadapt.workflows.seqft`; the distillation stages are strategies in
:mod:`medadapt.tuning.distill`.
"""
from medadapt.sequential.buffer import (BufferEntry, buffer_stability, lowest, mds_losses, mds_scores, random_pick,
                                        settled_repeats)
from medadapt.sequential.stream import Stream, StreamTask, load_stream, write_synthetic_stream

__all__ = ["BufferEntry", "Stream", "StreamTask", "buffer_stability", "load_stream", "lowest", "mds_losses",
           "mds_scores", "random_pick", "settled_repeats", "write_synthetic_stream"]
