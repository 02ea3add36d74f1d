// Shapes the loaded layers of a dump the way the layer policy reads them.
import type { KvDump, LoadedLayer } from '../cli/io/dump.js';

export function layerAttention(dump: KvDump, layers: LoadedLayer[]) {
  return layers.map((l, i) => ({
    layer: dump.layers[i].layer,
    q: l.q!,
    k: l.k,
    shape: { qHeads: dump.heads, kvHeads: dump.kvHeads, tokens: dump.tokens, headDim: dump.headDim, nQueries: dump.nQueries },
  }));
}
