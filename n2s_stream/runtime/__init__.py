"""The daemon's machinery between its sources and its sinks: the intake queue
(`intake`), series bookkeeping (`series`), the inference loop (`inference`) and the
engines it runs (`engine`, `onnx_engine`), calibration and the cold start
(`calibration`, `coldstart`), the model store (`snapshot`), online training (`trainer`
over `buffer`), refinement (`refine`), the state directory (`state`),
metrics, the preview page and systemd (`metrics`, `preview`, `heartbeat`, `service`),
the CPU priorities and what the stages share (`scheduler`), and the thread and memory
helpers (`worker`, `allocator`). The daemon itself
(`n2s_stream.daemon`) builds and wires these with the sources and sinks."""
