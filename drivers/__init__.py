"""Device knowledge: sources that read sensors and pure codecs that decode their payloads."""
