"""The test suite: unit/, integration/, faults/, and the helpers they share (helpers/)."""
