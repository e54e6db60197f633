"""jetpipe core library: reliable asynchronous ML jobs over many images.

Modules, one concept each; docs/architecture.md lists them and how data flows between them. The core
never imports `actors/`: it sends Dramatiq messages by actor name (`pipeline.broker.send`).
"""
