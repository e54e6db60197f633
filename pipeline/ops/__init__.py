"""What people do with jetpipe: the actions both front doors (`cli.py` and the web) call, the views of
jobs and health they show, exports, and operators' tools (the development stack, chaos, the demo).
"""
