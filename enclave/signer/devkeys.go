package signer

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/big"
)

// Deterministic development keys (Config.DevKeySeed).
//
// Several enclaves behind one proxy must serve one keyset (a Sign by key id
// must be valid wherever it lands). In production that keyset is sealed
// and opened by every attested enclave; for development and tests the keys
// are derived from a seed instead, so that two enclave processes given the
// same seed serve the same key ids.
//
// Every key reads its own endless byte stream: HKDF-SHA256 (RFC 5869)
// Extract of the seed, then Expand block after block with an info string
// naming the key (type and size or curve) and the block's index. The key
// name separates the domains: the RSA-2048 and the RSA-3072 key of one seed
// share no bytes, nor does a P-256 key with a P-384 one.
//
// The standard library's GenerateKey functions cannot be used with such a
// stream: since Go 1.26, crypto/rsa and crypto/ecdsa ignore the io.Reader
// they are given and always use the system's randomness. So:
//   - Ed25519: the key's 32-byte seed is the stream's first 32 bytes
//     (ed25519.NewKeyFromSeed, as RFC 8032 defines it).
//   - ECDSA: the scalar is drawn by rejection sampling (FIPS 186-5 A.2.2,
//     "rejection sampling"): the curve order's size in bytes from the
//     stream, again while the value is 0 or not below the order n; the key
//     is built with ecdsa.ParseRawPrivateKey.
//   - RSA: each prime is searched for among candidates read from the
//     stream, each with its top two bits and its low bit set (so that p*q
//     has exactly the requested size), skipping those with a factor below
//     sieveBound or with gcd(e, p-1) != 1, and tested with
//     ProbablyPrime(20) (20 Miller-Rabin rounds plus a Baillie-PSW test);
//     e = 65537, q != p and |p-q| > 2^(bits/2-100) (FIPS 186-5 A.1.3),
//     d = e^-1 mod lcm(p-1, q-1); the key is then Precomputed and
//     Validated.
//
// A derived key changes only if this derivation does: devKeyVersion names
// it in every info string, and a change of derivation must change it.

// devKeyVersion is part of every HKDF label: a change to the derivation
// below must change it, so old and new key ids never collide.
const devKeyVersion = "nitrosign dev-key-seed v1"

// DevKeySeedSize is the size of Config.DevKeySeed in bytes.
const DevKeySeedSize = 32

// DevKeySeed is the secret a development keyset is derived from. It never
// prints: fmt (every verb), zap's reflection and JSON or text encoding all
// see "[redacted]", so a Config logged or wrapped into an error by mistake
// does not give the keys away.
type DevKeySeed []byte

const redacted = "[redacted]"

// String implements fmt.Stringer.
func (DevKeySeed) String() string { return redacted }

// GoString implements fmt.GoStringer (%#v).
func (DevKeySeed) GoString() string { return redacted }

// Format implements fmt.Formatter: every verb, %x and %d included.
func (DevKeySeed) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, redacted) }

// MarshalText implements encoding.TextMarshaler (JSON and zap's reflection).
func (DevKeySeed) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// devStream is one key's deterministic byte stream; see the comment above.
type devStream struct {
	prk   []byte
	key   string
	block uint64
	buf   []byte
}

// devBlock is the largest output of one HKDF-SHA256 Expand (255 hashes).
const devBlock = 255 * sha256.Size

func newDevStream(seed DevKeySeed, key string) (*devStream, error) {
	if len(seed) != DevKeySeedSize {
		return nil, fmt.Errorf("dev key seed is %d bytes, want %d", len(seed), DevKeySeedSize)
	}
	prk, err := hkdf.Extract(sha256.New, seed, []byte(devKeyVersion))
	if err != nil {
		return nil, fmt.Errorf("derive %s key: HKDF extract: %w", key, err)
	}
	return &devStream{prk: prk, key: key}, nil
}

// Read fills p from the stream; it fails only if HKDF does.
func (s *devStream) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if len(s.buf) == 0 {
			b, err := hkdf.Expand(sha256.New, s.prk, fmt.Sprintf("%s %s block %d", devKeyVersion, s.key, s.block), devBlock)
			if err != nil {
				return n, fmt.Errorf("derive %s key: HKDF expand: %w", s.key, err)
			}
			s.block++
			s.buf = b
		}
		c := copy(p[n:], s.buf)
		clear(s.buf[:c])
		s.buf = s.buf[c:]
		n += c
	}
	return n, nil
}

// deriveEd25519 derives the Ed25519 key of seed.
func deriveEd25519(seed DevKeySeed) (ed25519.PrivateKey, error) {
	r, err := newDevStream(seed, "Ed25519")
	if err != nil {
		return nil, err
	}
	b := make([]byte, ed25519.SeedSize)
	defer clear(b)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return ed25519.NewKeyFromSeed(b), nil
}

// deriveECDSA derives the ECDSA key of seed on curve (name is its name in
// the HKDF label: "P-256" or "P-384").
func deriveECDSA(seed DevKeySeed, curve elliptic.Curve, name string) (*ecdsa.PrivateKey, error) {
	r, err := newDevStream(seed, "ECC-"+name)
	if err != nil {
		return nil, err
	}
	n := curve.Params().N
	bits := n.BitLen()
	b := make([]byte, (bits+7)/8)
	defer clear(b)
	// The chance of a rejection is below 2^-32 on both curves: 64 draws
	// in a row never fail but by a broken derivation.
	for range 64 {
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		b[0] &= 0xff >> (len(b)*8 - bits) // as many bits as n has
		d := new(big.Int).SetBytes(b)
		if d.Sign() == 0 || d.Cmp(n) >= 0 {
			continue
		}
		k, err := ecdsa.ParseRawPrivateKey(curve, b)
		if err != nil {
			return nil, fmt.Errorf("derive ECC-%s key: %w", name, err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("derive ECC-%s key: no scalar below the curve order in 64 draws", name)
}

// rsaExponent is the public exponent of derived RSA keys (as of
// rsa.GenerateKey).
const rsaExponent = 65537

// deriveRSA derives the RSA key of seed with a modulus of bits bits.
func deriveRSA(seed DevKeySeed, bits int) (*rsa.PrivateKey, error) {
	if bits < 1024 || bits%2 != 0 {
		return nil, fmt.Errorf("derive RSA key: size %d: want an even size of at least 1024 bits", bits)
	}
	name := fmt.Sprintf("RSA-%d", bits)
	r, err := newDevStream(seed, name)
	if err != nil {
		return nil, err
	}
	half := bits / 2
	p, err := devPrime(r, half)
	if err != nil {
		return nil, fmt.Errorf("derive %s key: %w", name, err)
	}
	// q is the next prime of the stream far enough from p: a prime equal
	// or close to p (probability far below 2^-100) is skipped.
	minDistance := new(big.Int).Lsh(big.NewInt(1), uint(half-100))
	var q *big.Int
	for range 8 {
		if q, err = devPrime(r, half); err != nil {
			return nil, fmt.Errorf("derive %s key: %w", name, err)
		}
		if new(big.Int).Abs(new(big.Int).Sub(p, q)).Cmp(minDistance) > 0 {
			break
		}
		q = nil
	}
	if q == nil {
		return nil, fmt.Errorf("derive %s key: no second prime far enough from the first", name)
	}
	one := big.NewInt(1)
	nMod := new(big.Int).Mul(p, q)
	if nMod.BitLen() != bits {
		return nil, fmt.Errorf("derive %s key: modulus has %d bits", name, nMod.BitLen())
	}
	pm1 := new(big.Int).Sub(p, one)
	qm1 := new(big.Int).Sub(q, one)
	gcd := new(big.Int).GCD(nil, nil, pm1, qm1)
	lambda := new(big.Int).Div(new(big.Int).Mul(pm1, qm1), gcd) // lcm(p-1, q-1)
	d := new(big.Int).ModInverse(big.NewInt(rsaExponent), lambda)
	if d == nil {
		return nil, fmt.Errorf("derive %s key: e is not invertible modulo lcm(p-1, q-1)", name)
	}
	k := &rsa.PrivateKey{
		PublicKey: rsa.PublicKey{N: nMod, E: rsaExponent},
		D:         d,
		Primes:    []*big.Int{p, q},
	}
	k.Precompute()
	if err := k.Validate(); err != nil {
		return nil, fmt.Errorf("derive %s key: %w", name, err)
	}
	return k, nil
}

// devPrime reads candidates of exactly bits bits from r (top two bits and
// low bit set) until one is a probable prime p with gcd(e, p-1) = 1.
func devPrime(r io.Reader, bits int) (*big.Int, error) {
	b := make([]byte, (bits+7)/8)
	defer clear(b)
	e := big.NewInt(rsaExponent)
	one := big.NewInt(1)
	pm1, gcd := new(big.Int), new(big.Int)
	// About one odd candidate in bits*ln(2)/2 is prime (one in 355 for
	// RSA-2048's primes): 100 times that many never all fail but by a
	// broken derivation.
	maxCandidates := 100 * bits
	for range maxCandidates {
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		b[0] &= 0xff >> (len(b)*8 - bits)
		p := new(big.Int).SetBytes(b)
		p.SetBit(p, bits-1, 1)
		p.SetBit(p, bits-2, 1)
		p.SetBit(p, 0, 1)
		if hasSmallFactor(p) || gcd.GCD(nil, nil, e, pm1.Sub(p, one)).Cmp(one) != 0 {
			continue
		}
		if p.ProbablyPrime(20) {
			return p, nil
		}
	}
	return nil, errors.New("no prime found in the candidates: derivation broken")
}

// sieveBound: hasSmallFactor tries every odd prime below it. Trial
// division is far cheaper than a Miller-Rabin round, and ProbablyPrime
// itself only tries the primes up to 53: this bound makes the search for
// an RSA-2048 key about twice as fast (measured in TestDevKeyDerivationTime).
const sieveBound = 4096

// sieveGroups are the odd primes below sieveBound, grouped so that each
// group's product fits a uint64.
var sieveGroups = func() (groups []sieveGroup) {
	composite := make([]bool, sieveBound)
	var g sieveGroup
	for n := 3; n < sieveBound; n += 2 {
		if composite[n] {
			continue
		}
		for m := n * n; m < sieveBound; m += 2 * n {
			composite[m] = true
		}
		if g.product > (1<<64-1)/uint64(n) {
			groups = append(groups, g)
			g = sieveGroup{}
		}
		if g.product == 0 {
			g.product = 1
		}
		g.product *= uint64(n)
		g.primes = append(g.primes, uint64(n))
	}
	return append(groups, g)
}()

type sieveGroup struct {
	product uint64
	primes  []uint64
}

// hasSmallFactor reports whether an odd prime below sieveBound divides p
// (p larger than all of them).
func hasSmallFactor(p *big.Int) bool {
	var m, r big.Int
	for _, g := range sieveGroups {
		rem := r.Rem(p, m.SetUint64(g.product)).Uint64()
		for _, q := range g.primes {
			if rem%q == 0 {
				return true
			}
		}
	}
	return false
}
