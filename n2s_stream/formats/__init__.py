"""File and wire formats, with no threads and no daemon state: HDF5 input (`stack`),
HDF5 output (`writer`, which alone names and lays out outputs; `output_format` its dtype
and codec; `superblock` the recovery of files a killed writer left flagged), checkpoints
(`checkpoint`), the refiner's spool files (`spool`), the detectors' payload codecs
(`codecs`), areaDetector's NTNDArray (`ntndarray`), the ZeroMQ wire formats (`protocols`)
and file-safe names (`names`)."""
