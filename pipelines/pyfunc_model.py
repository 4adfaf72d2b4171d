"""The MLflow pyfunc loader of a registered cnnzoo model, logged "from code": MLflow stores this file, not a pickle.

A registered version's artifacts are this file, ``artifacts/model.pt`` (the weights-only checkpoint: the
architecture's cnnmodels name and options, the weights and the preprocessing spec; no optimizer state) and
``artifacts/preprocess.json`` (the same spec, for reading). Loading rebuilds the architecture from the
installed ``cnnmodels`` by name and reads the weights with ``torch.load(weights_only=True)``
(:func:`~pipelines.checkpoints.load_checkpoint`), so nothing is unpickled and a tampered checkpoint is refused.
``mlflow.pyfunc.load_model`` does run this file as stored with the version (models from code): write access to
the artifact store is code execution for whoever loads the model that way (Serve replicas read only ``model.pt``)::

    import mlflow, numpy as np
    from PIL import Image

    model = mlflow.pyfunc.load_model("models:/quickstart@champion")   # needs cnnzoo installed
    classifier = model.unwrap_python_model()
    x = classifier.spec.tensor_from_image(Image.open("digit.png")).numpy()   # (1, C, H, W), as in training
    logits = model.predict(x)                                                # (1, num_classes)
    classifier.spec.class_names[int(logits.argmax())]

Input: float32 ``(N, C, H, W)`` arrays preprocessed with the version's spec; output: the logits.
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

#: The name of the checkpoint among the logged model's artifacts.
CHECKPOINT_ARTIFACT = "checkpoint"


class CnnzooClassifier(PythonModel):
    """A cnnmodels classifier rebuilt from a weights-only checkpoint."""

    def load_context(self, context) -> None:
        from pipelines.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model = checkpoint.build_model()
        self.spec = checkpoint.spec  #: the PreprocessSpec: image_size, channels, mean, std, class_names, ...
        self.arch = checkpoint.arch

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """Logits ``(N, num_classes)`` for preprocessed images ``(N, C, H, W)``."""
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(images).numpy()


mlflow.models.set_model(CnnzooClassifier())
