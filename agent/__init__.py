"""The edgepack device agent: runs bundles offline, serves and measures them.

Imports only the light ``edgepack`` core and its own modules: never torch, onnx or the converters.
"""
