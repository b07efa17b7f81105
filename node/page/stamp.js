// A timestamp drawn into each sent frame and read back from each received one: glass-to-glass
// latency measured in the page, through every hop and codec, with one clock (performance.now()).
//
// A row of square blocks along the bottom edge: a white and a black reference block, then 24 bits
// of the time in ms (modulo 2^24) and 8 check bits, white = 1. The reference blocks give the
// threshold, so a processor that changes colours (a tint) still reads back; the check bits make a
// frame whose blocks were smeared by the codec read as "no stamp" rather than a wrong time.

export const BLOCK = 16; // pixels, at the 640x480 the page sends: big enough to survive H.264
const BITS = 24;
const CHECK = 8;
const BLOCKS = 2 + BITS + CHECK;
export const STAMP_WIDTH = BLOCKS * BLOCK;
const MASK = (1 << BITS) - 1;

function check(value) {
  return (value ^ (value >> 8) ^ (value >> 16) ^ 0x5a) & 0xff;
}

export function drawStamp(ctx, height, now) {
  const value = Math.round(now) & MASK;
  const bits = [1, 0];
  for (let i = BITS - 1; i >= 0; i--) bits.push((value >> i) & 1);
  const sum = check(value);
  for (let i = CHECK - 1; i >= 0; i--) bits.push((sum >> i) & 1);
  bits.forEach((bit, i) => {
    ctx.fillStyle = bit ? "#fff" : "#000";
    ctx.fillRect(i * BLOCK, height - BLOCK, BLOCK, BLOCK);
  });
}

// The time the frame in `ctx` was stamped, or null when there is no readable stamp.
export function readStamp(ctx, height) {
  const { data } = ctx.getImageData(0, height - BLOCK, STAMP_WIDTH, BLOCK);
  const level = (block) => {
    let sum = 0; // the middle 8x8 of the block, away from edges the codec blurs
    for (let y = 4; y < 12; y++) {
      for (let x = block * BLOCK + 4; x < block * BLOCK + 12; x++) {
        const at = (y * STAMP_WIDTH + x) * 4;
        sum += data[at] + data[at + 1] + data[at + 2];
      }
    }
    return sum / 64;
  };
  const white = level(0);
  const black = level(1);
  if (white - black < 60) return null;
  const threshold = (white + black) / 2;
  let value = 0;
  let sum = 0;
  for (let i = 0; i < BITS; i++) value = (value << 1) | (level(2 + i) > threshold ? 1 : 0);
  for (let i = 0; i < CHECK; i++) sum = (sum << 1) | (level(2 + BITS + i) > threshold ? 1 : 0);
  return sum === check(value) ? value : null;
}

// How long ago a stamp was drawn, in ms, given the time now.
export function age(stamp, now) {
  return ((Math.round(now) & MASK) - stamp + MASK + 1) % (MASK + 1);
}
