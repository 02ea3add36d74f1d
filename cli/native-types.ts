// Types of the packkv_native addon's JavaScript surface (implemented in kernels/binding/).

/** K = keys, V = values: the codecs treat them differently (per-channel vs per-token grouping). */
export type TensorKind = 'K' | 'V';

/** One layer's K or V tensor, batch folded into heads: row-major [kvHeads, tokens, headDim]. */
export interface KvShape {
  kvHeads: number;
  tokens: number;
  headDim: number;
}

/**
 * Every byte a codec stores for a tensor, by role (DESIGN.md "Accounting").
 * deviceBytes = payload + scales + zeros + residual + metadata; host = offloaded tokens.
 * The stream's own shape header (the model config knows it) is not counted.
 */
export interface ByteBreakdown {
  payload: number;
  scales: number;
  zeros: number;
  residual: number;
  metadata: number;
  host: number;
}

export interface EncodedTensor {
  codec: string;
  /** canonical, fully specified parameter string, e.g. "bits=2,group=32,residual=128" */
  params: string;
  kind: TensorKind;
  shape: KvShape;
  /** self-describing compressed stream: decode/qk/pv need nothing else */
  stream: Uint8Array;
  breakdown: ByteBreakdown;
  /** bytes on the device: payload + scales + zeros + residual + metadata */
  deviceBytes: number;
  /** device + host bytes */
  totalBytes: number;
}

export interface StreamInfo {
  codec: string;
  params: string;
  kind: TensorKind;
  shape: KvShape;
  breakdown: ByteBreakdown;
}

export interface CodecParamSpec {
  name: string;
  type: 'int' | 'float' | 'enum';
  default: string;
  choices?: string[];
  min?: number;
  max?: number;
  help: string;
  /** the knob `packkv tune` turns: tensors it affects ('K', 'V', 'KV') and '+' when a larger value compresses more, '-' when a smaller one does */
  tune?: string;
}

export interface CodecInfo {
  name: string;
  summary: string;
  params: CodecParamSpec[];
  /** codec specs `bench` runs when the user names none, e.g. ["kivi:bits=2", "kivi:bits=4"] */
  defaultRuns: string[];
}

export interface BackendStatus {
  usable: boolean;
  /** why not, when not usable */
  reason?: string;
  /** device name, when usable */
  device?: string;
}

export interface NativeAddon {
  version(): string;
  backends(): { cpu: BackendStatus; cuda: BackendStatus };
  codecs(): CodecInfo[];
  /** Validates and canonicalises "name:k=v,..."; throws listing the valid names/params. */
  parseCodec(spec: string): { codec: string; params: string };
  /**
   * data: f32 [kvHeads, tokens, headDim]. label names the tensor in error messages.
   */
  encode(spec: string, kind: TensorKind, data: Float32Array, shape: KvShape, label?: string): Promise<EncodedTensor>;
  decode(stream: Uint8Array, label?: string): Promise<Float32Array>;
  streamInfo(stream: Uint8Array): StreamInfo;
  /**
   * scores = q · Kᵀ on the compressed key stream. q: f32 [nQueries, qHeads, headDim];
   * result f32 [nQueries, qHeads, tokens]. Query head h reads KV head h / (qHeads / kvHeads).
   */
  qk(stream: Uint8Array, q: Float32Array, qHeads: number, nQueries: number, label?: string): Promise<Float32Array>;
  /**
   * out = p · V on the compressed value stream. p: f32 [nQueries, qHeads, tokens];
   * result f32 [nQueries, qHeads, headDim].
   */
  pv(stream: Uint8Array, p: Float32Array, qHeads: number, nQueries: number, label?: string): Promise<Float32Array>;
  /** Codecs with CUDA kernels in this build (empty without CUDA). */
  gpuCodecs(): string[];
  /**
   * Runs decode / q·Kᵀ / p·V on the GPU over the stream's body (x as for qk/pv, converted to
   * fp16; null for decode): 3 warm-up runs, then `repeats` timed with CUDA events. Output buffers
   * are poisoned with NaN before each run; an unwritten output rejects. 'encode': x is the tensor
   * the stream was encoded from; the GPU encoder's body and byte breakdown must equal the stream's
   * (the CPU encoder's), else it rejects naming the first differing byte; `result` is empty.
   */
  gpuRun(op: 'decode' | 'qk' | 'pv' | 'encode', stream: Uint8Array, x: Float32Array | null, qHeads: number, nQueries: number, repeats: number, label?: string): Promise<GpuRunResult>;
}

export interface GpuRunResult {
  result: Float32Array;
  /** median of the timed repeats, milliseconds */
  medianMs: number;
  minMs: number;
  repeats: number;
  device: string;
}
