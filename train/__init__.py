"""Training: MobileNetV2 transfer learning on lung images (TensorFlow imported lazily)."""
