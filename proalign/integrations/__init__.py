"""proalign models in other libraries: sentence-transformers and clip_benchmark. Each module here
imports its library only when used; none is imported by `import proalign`."""
