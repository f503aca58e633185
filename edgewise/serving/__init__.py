"""The serving pieces every service shares, below the services (ADR 0001).

* :mod:`edgewise.serving.runtime`: runtime backends (ONNX Runtime, LiteRT, Coral Edge TPU)
* :mod:`edgewise.serving.model`: :class:`ServedModel`, a loaded model with its verdicts
* :mod:`edgewise.serving.verdict`: turning model outputs into labels and confidences
* :mod:`edgewise.serving.batcher`: micro-batching of frames for the model
* :mod:`edgewise.serving.acks`: in-order MQTT acknowledgement after a durable commit
* :mod:`edgewise.serving.errors`: the errors of this layer
"""
