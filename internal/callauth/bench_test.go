package callauth

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// benchRequest is the bytes of a typical Sign request: a 32-byte digest
// by key type.
func benchRequest(b *testing.B) []byte {
	b.Helper()
	msg, err := proto.MarshalOptions{Deterministic: true}.Marshal(&pb.SignRequest{
		Key:         &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}},
		Message:     bytes.Repeat([]byte{0xab}, 32),
		MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST,
	})
	if err != nil {
		b.Fatal(err)
	}
	return msg
}

// benchVerify is the enclave's check of one call, the replay cache
// aside: ParseMetadata, then Verify over the request bytes.
func benchVerify(b *testing.B, kind string) {
	id := newID(b, kind)
	msg := benchRequest(b)
	md, err := Sign(id, testMethod, msg, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	pub := id.Public()
	b.ReportAllocs()
	for b.Loop() {
		c, err := ParseMetadata(md)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Verify(pub, testMethod, msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyEd25519 is ParseMetadata + Verify of an Ed25519 caller's
// Sign call.
func BenchmarkVerifyEd25519(b *testing.B) { benchVerify(b, TypeEd25519) }

// BenchmarkVerifyP256 is ParseMetadata + Verify of a P-256 caller's Sign
// call.
func BenchmarkVerifyP256(b *testing.B) { benchVerify(b, TypeP256) }

// BenchmarkParseMetadata is the parsing alone.
func BenchmarkParseMetadata(b *testing.B) {
	md, err := Sign(newID(b, TypeEd25519), testMethod, benchRequest(b), time.Now())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseMetadata(md); err != nil {
			b.Fatal(err)
		}
	}
}

// The primitives alone, for comparison with the Verify benchmarks: what
// the canonical form and the parsing add to them.
func BenchmarkPrimitiveEd25519Verify(b *testing.B) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	signed := make([]byte, 250)
	sig := ed25519.Sign(priv, signed)
	b.ReportAllocs()
	for b.Loop() {
		if !ed25519.Verify(pub, signed, sig) {
			b.Fatal("no")
		}
	}
}

func BenchmarkPrimitiveECDSAP256Verify(b *testing.B) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	digest := sha256.Sum256([]byte("x"))
	sig, _ := ecdsa.SignASN1(rand.Reader, priv, digest[:])
	b.ReportAllocs()
	for b.Loop() {
		if !ecdsa.VerifyASN1(&priv.PublicKey, digest[:], sig) {
			b.Fatal("no")
		}
	}
}

// BenchmarkSignECDSAP256 is one ECDSA P-256 signature over a 32-byte
// digest with crypto/ecdsa: the work of the enclave's cheapest Sign call,
// the yardstick of the checks above.
func BenchmarkSignECDSAP256(b *testing.B) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ecdsa.SignASN1(rand.Reader, priv, digest[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSign is the client's side: a fresh nonce and a signature.
func BenchmarkSign(b *testing.B) {
	msg := benchRequest(b)
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			id := newID(b, kind)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Sign(id, testMethod, msg, time.Now()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// replayLoad is a stream of fresh calls for the replay cache at a steady
// rate of 64 calls per millisecond of the clock, so that it rotates as a
// busy enclave's does (a generation of 2 x 1 s holds 128,000 calls, under
// the default capacity) and a nonce comes back only after 1<<20 calls,
// 8 generations later.
type replayLoad struct {
	nonces []string
	base   time.Time
}

func newReplayLoad() *replayLoad {
	l := &replayLoad{nonces: make([]string, 1<<20), base: time.Now()}
	for i := range l.nonces {
		l.nonces[i] = fmt.Sprintf("%032x", uint64(i)*0x9e3779b97f4a7c15)
	}
	return l
}

// call fills c with call i and returns the time to check it at.
func (l *replayLoad) call(c *Claims, i uint64) time.Time {
	now := l.base.Add(time.Duration(i/64) * time.Millisecond)
	c.nonce = l.nonces[i&(1<<20-1)]
	c.ts = now.UnixMilli()
	return now
}

// BenchmarkReplayCheck is Check of a fresh call, rotations included.
func BenchmarkReplayCheck(b *testing.B) {
	l := newReplayLoad()
	r := newCache(b, time.Second, DefaultCapacity)
	c := &Claims{caller: strings.Repeat("ab", 32)}
	var i uint64
	b.ReportAllocs()
	for b.Loop() {
		now := l.call(c, i)
		i++
		if err := r.Check(c, now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplayCheckParallel is BenchmarkReplayCheck from GOMAXPROCS
// goroutines at once: the contention on the cache's one mutex.
func BenchmarkReplayCheckParallel(b *testing.B) {
	l := newReplayLoad()
	r := newCache(b, time.Second, DefaultCapacity)
	var next atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c := &Claims{caller: strings.Repeat("cd", 32)}
		for pb.Next() {
			now := l.call(c, next.Add(1))
			// Goroutines race to the clock: a call a few ms older than the
			// cache's newest is fine, one older than a rotation is still
			// in the window.
			if err := r.Check(c, now); err != nil {
				b.Fatal(err)
			}
		}
	})
}
