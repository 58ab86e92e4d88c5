//! GGUF reader (stub — being written).
