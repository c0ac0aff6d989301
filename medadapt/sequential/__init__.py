"""Sequential fine-tuning over a stream of tasks (MedSeqFT): stream files and the replay buffer.

The training itself is :mod:`medadapt.workflows.seqft`; the distillation stages are strategies in
:mod:`medadapt.tuning.distill`.
"""
from medadapt.sequential.buffer import BufferEntry, lowest, mds_scores, random_pick
from medadapt.sequential.stream import Stream, StreamTask, load_stream, write_synthetic_stream

__all__ = ["BufferEntry", "Stream", "StreamTask", "load_stream", "lowest", "mds_scores", "random_pick",
           "write_synthetic_stream"]
