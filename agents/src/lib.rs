//! Ready-made tool-using agents for troupe (empty until the agents issue lands).
