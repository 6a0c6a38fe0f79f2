// The Live mode's capture, on the audio thread: the microphone (its first input, channels mixed) resampled to 24 kHz
// mono PCM16 little-endian, the Realtime API's audio/pcm, posted to the page in 100 ms chunks.
'use strict';

const TARGET_RATE = 24000;
const CHUNK_SAMPLES = TARGET_RATE / 10;

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    // `sampleRate` is the context's rate: 24 kHz where the browser honours the page's request, else the device's.
    this.step = sampleRate / TARGET_RATE;
    this.position = 0; // the next output sample's place in this block's input; -1 is the block before's last sample
    this.previous = 0;
    this.newChunk();
    this.port.onmessage = (event) => {
      if (event.data !== 'flush') return;
      this.post();
      this.port.postMessage({ flushed: true });
    };
  }

  newChunk() {
    this.chunk = new DataView(new ArrayBuffer(CHUNK_SAMPLES * 2));
    this.filled = 0;
  }

  post() {
    if (this.filled === 0) return;
    const buffer = this.chunk.buffer.slice(0, this.filled * 2);
    this.port.postMessage({ pcm16: buffer }, [buffer]);
    this.newChunk();
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const length = channels[0].length;
    const mono = new Float32Array(length);
    for (const channel of channels) for (let i = 0; i < length; i += 1) mono[i] += channel[i] / channels.length;
    // Linear interpolation between neighbours; at 24 kHz in and out it passes every sample through unchanged.
    let t = this.position;
    for (; t + 1 < length; t += this.step) {
      const i = Math.floor(t);
      const fraction = t - i;
      const a = i < 0 ? this.previous : mono[i];
      const value = a + (mono[i + 1] - a) * fraction;
      this.chunk.setInt16(this.filled * 2, Math.round(Math.max(-1, Math.min(1, value)) * 32767), true);
      this.filled += 1;
      if (this.filled === CHUNK_SAMPLES) this.post();
    }
    this.position = t - length;
    this.previous = mono[length - 1];
    return true;
  }
}

registerProcessor('pcm16-capture', Pcm16Capture);
