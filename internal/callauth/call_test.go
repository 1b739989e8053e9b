package callauth

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
)

const testMethod = "/nitrosign.v1.SignerService/Sign"

var testTime = time.Date(2026, 1, 1, 0, 0, 0, 123_456_789, time.UTC)

// The signed bytes, built from the package documentation by hand.
func TestSignedBytesFormat(t *testing.T) {
	caller := strings.Repeat("ab", 32)
	got, err := SignedBytes(testMethod, []byte("abc"), caller, 1767225600000, "000102030405060708090a0b0c0d0e0f")
	if err != nil {
		t.Fatal(err)
	}
	want := "nitrosign-call-v1\n" +
		"/nitrosign.v1.SignerService/Sign\n" +
		"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n" +
		caller + "\n" +
		"1767225600000\n" +
		"000102030405060708090a0b0c0d0e0f"
	if string(got) != want {
		t.Fatalf("SignedBytes =\n%q\nwant\n%q", got, want)
	}
	// An empty message hashes as empty bytes; timestamp 0 is "0".
	got, err = SignedBytes("/a", nil, caller, 0, strings.Repeat("f", 32))
	if err != nil {
		t.Fatal(err)
	}
	want = "nitrosign-call-v1\n/a\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n" + caller + "\n0\n" + strings.Repeat("f", 32)
	if string(got) != want {
		t.Fatalf("SignedBytes =\n%q\nwant\n%q", got, want)
	}
}

func TestSignedBytesRefusals(t *testing.T) {
	caller, nonce := strings.Repeat("0", 64), strings.Repeat("0", 32)
	for _, tc := range []struct {
		name                  string
		method, caller, nonce string
		ts                    int64
		want                  string
	}{
		{"newline in method", "/a\n/b", caller, nonce, 1, "not printable"},
		{"space in method", "/a b", caller, nonce, 1, "not printable"},
		{"non-ASCII method", "/é", caller, nonce, 1, "not printable"},
		{"relative method", "a/b", caller, nonce, 1, `begin with "/"`},
		{"short method", "/", caller, nonce, 1, "1 bytes"},
		{"long method", "/" + strings.Repeat("a", MaxMethodLen), caller, nonce, 1, "257 bytes"},
		{"upper-case caller", testMethod, strings.Repeat("A", 64), nonce, 1, "caller"},
		{"newline caller", testMethod, strings.Repeat("0", 63) + "\n", nonce, 1, "caller"},
		{"short caller", testMethod, caller[1:], nonce, 1, "caller"},
		{"negative time", testMethod, caller, nonce, -1, "timestamp"},
		{"far future", testMethod, caller, nonce, maxTimestamp + 1, "timestamp"},
		{"short nonce", testMethod, caller, nonce[1:], 1, "nonce"},
		{"newline nonce", testMethod, caller, nonce[1:] + "\n", 1, "nonce"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := SignedBytes(tc.method, nil, tc.caller, tc.ts, tc.nonce)
			if !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrInvalidInput saying %q", err, tc.want)
			}
		})
	}
	id := newID(t, TypeEd25519)
	if _, err := Sign(id, "/a\nb", nil, testTime); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("Sign with a newline in the method: %v", err)
	}
	if _, err := Sign(id, testMethod, nil, time.UnixMilli(-1)); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("Sign before 1970: %v", err)
	}
	if _, err := Sign(nil, testMethod, nil, testTime); err == nil {
		t.Fatal("Sign with a nil identity")
	}
}

func TestSignVerify(t *testing.T) {
	msg := []byte("\n\x05hello")
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			id := newID(t, kind)
			md, err := Sign(id, testMethod, msg, testTime)
			if err != nil {
				t.Fatal(err)
			}
			if len(md) != 4 {
				t.Fatalf("metadata %v: want the four entries", md)
			}
			for k := range md {
				if k != strings.ToLower(k) || !strings.HasPrefix(k, "nitrosign-") {
					t.Fatalf("metadata name %q", k)
				}
			}
			c, err := ParseMetadata(md)
			if err != nil {
				t.Fatal(err)
			}
			if c.Caller() != id.KeyID() || !c.Time().Equal(testTime.Truncate(time.Millisecond)) || c.TimestampMillis() != testTime.UnixMilli() || len(c.Nonce()) != 32 {
				t.Fatalf("claims: caller %s time %s nonce %s", c.Caller(), c.Time(), c.Nonce())
			}
			if err := c.Verify(id.Public(), testMethod, msg); err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if err := c.VerifyDigest(id.Public(), testMethod, sha256.Sum256(msg)); err != nil {
				t.Fatalf("VerifyDigest: %v", err)
			}
			// The signature is the documented one over SignedBytes.
			signed, err := SignedBytes(testMethod, msg, c.Caller(), c.TimestampMillis(), c.Nonce())
			if err != nil {
				t.Fatal(err)
			}
			sig := []byte(md[MDSignature][0])
			switch kind {
			case TypeEd25519:
				if !ed25519.Verify(id.ed.Public().(ed25519.PublicKey), signed, sig) {
					t.Fatal("not an Ed25519 signature of SignedBytes")
				}
			case TypeP256:
				sum := sha256.Sum256(signed)
				if !ecdsa.VerifyASN1(&id.ec.PublicKey, sum[:], sig) {
					t.Fatal("not an ECDSA signature of SHA-256(SignedBytes)")
				}
			}
			// Fresh nonces.
			md2, _ := Sign(id, testMethod, msg, testTime)
			if md2[MDNonce][0] == md[MDNonce][0] {
				t.Fatal("two calls with the same nonce")
			}
		})
	}
}

// signedCall signs a call of testMethod at testTime.
func signedCall(t *testing.T, id *Identity, msg []byte) metadata.MD {
	t.Helper()
	md, err := Sign(id, testMethod, msg, testTime)
	if err != nil {
		t.Fatal(err)
	}
	return md
}

func with(md metadata.MD, key, value string) metadata.MD {
	c := md.Copy()
	c[key] = []string{value}
	return c
}

// Every change to a signed call is detected.
func TestTamperDetected(t *testing.T) {
	msg := []byte("\x0a\x10a message to sign\x18\x01")
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			id, other := newID(t, kind), newID(t, kind)
			otherKind := newID(t, map[string]string{TypeEd25519: TypeP256, TypeP256: TypeEd25519}[kind])
			md := signedCall(t, id, msg)
			pub := id.Public()
			verify := func(md metadata.MD, pub Caller, method string, msg []byte) error {
				c, err := ParseMetadata(md)
				if err != nil {
					t.Fatalf("ParseMetadata of a tampered call: %v", err)
				}
				return c.Verify(pub, method, msg)
			}
			mustFail := func(what string, err error, want string) {
				t.Helper()
				if !errors.Is(err, ErrBadSignature) || !strings.Contains(err.Error(), want) {
					t.Errorf("%s: %v, want ErrBadSignature saying %q", what, err, want)
				}
			}
			if err := verify(md, pub, testMethod, msg); err != nil {
				t.Fatalf("untampered: %v", err)
			}

			mustFail("other method", verify(md, pub, "/nitrosign.v1.KeyAdminService/CreateKey", msg), "bad caller signature")
			mustFail("method case", verify(md, pub, strings.ToLower(testMethod), msg), "bad caller signature")
			mustFail("bad method", verify(md, pub, "/a\nb", msg), "not printable")
			for bit := 0; bit < 8*len(msg); bit++ {
				m := bytes.Clone(msg)
				m[bit/8] ^= 1 << (bit % 8)
				if err := verify(md, pub, testMethod, m); !errors.Is(err, ErrBadSignature) {
					t.Fatalf("bit %d of the message flipped: %v", bit, err)
				}
			}
			mustFail("message extended", verify(md, pub, testMethod, append(bytes.Clone(msg), 0)), "bad caller signature")
			mustFail("message empty", verify(md, pub, testMethod, nil), "bad caller signature")

			// Another caller id: with our key the ids differ; with its key
			// the signature is ours.
			omd := with(md, MDCaller, other.KeyID())
			mustFail("other caller id, our key", verify(omd, pub, testMethod, msg), "the key given is")
			mustFail("other caller id, its key", verify(omd, other.Public(), testMethod, msg), "bad caller signature")

			ts, _ := strconv.ParseInt(md[MDTimestamp][0], 10, 64)
			mustFail("timestamp +1", verify(with(md, MDTimestamp, strconv.FormatInt(ts+1, 10)), pub, testMethod, msg), "bad caller signature")
			mustFail("timestamp -1", verify(with(md, MDTimestamp, strconv.FormatInt(ts-1, 10)), pub, testMethod, msg), "bad caller signature")

			n := []byte(md[MDNonce][0])
			// Another lower-case hex digit in the last place.
			if n[31] == '0' {
				n[31] = '1'
			} else {
				n[31] = '0'
			}
			mustFail("other nonce", verify(with(md, MDNonce, string(n)), pub, testMethod, msg), "bad caller signature")

			// The same call signed by another identity, sent under ours.
			omd2 := signedCall(t, other, msg)
			forged := with(omd2, MDCaller, id.KeyID())
			mustFail("signature of another identity", verify(forged, pub, testMethod, msg), "bad caller signature")
			forged2 := with(md, MDSignature, signedCall(t, otherKind, msg)[MDSignature][0])
			mustFail("signature of another key type", verify(with(forged2, MDTimestamp, md[MDTimestamp][0]), pub, testMethod, msg), "")

			sig := md[MDSignature][0]
			for _, cut := range []int{1, len(sig) / 2, len(sig) - 1} {
				mustFail("truncated signature", verify(with(md, MDSignature, sig[:cut]), pub, testMethod, msg), "")
			}
			mustFail("signature extended", verify(with(md, MDSignature, sig+"\x00"), pub, testMethod, msg), "")
			flipped := []byte(sig)
			flipped[len(flipped)-1] ^= 1
			mustFail("signature bit", verify(with(md, MDSignature, string(flipped)), pub, testMethod, msg), "")

			// Verify with no key, or a nil Claims.
			mustFail("zero Caller", verify(md, Caller{}, testMethod, msg), "no public key")
			mustFail("nil claims", (*Claims)(nil).Verify(pub, testMethod, msg), "no claims")
		})
	}
}

func TestParseMetadataRefusals(t *testing.T) {
	id := newID(t, TypeEd25519)
	good := signedCall(t, id, nil)
	without := func(key string) metadata.MD {
		c := good.Copy()
		delete(c, key)
		return c
	}
	twice := func(key string) metadata.MD {
		c := good.Copy()
		c[key] = append(c[key], c[key][0])
		return c
	}
	emptyCaller := good.Copy()
	emptyCaller[MDCaller] = []string{}
	for _, tc := range []struct {
		name string
		md   metadata.MD
		is   error
		want string // "" for success
	}{
		{"nil", nil, ErrMissing, "none of"},
		{"empty", metadata.MD{}, ErrMissing, "none of"},
		{"other entries only", metadata.MD{"authorization": {"Bearer x"}, "nitrosign-signature": {"x"}}, ErrMissing, "none of"},
		{"caller missing", without(MDCaller), ErrMalformed, "nitrosign-caller is missing"},
		{"timestamp missing", without(MDTimestamp), ErrMalformed, "nitrosign-timestamp is missing"},
		{"nonce missing", without(MDNonce), ErrMalformed, "nitrosign-nonce is missing"},
		{"signature missing", without(MDSignature), ErrMalformed, "nitrosign-signature-bin is missing"},
		{"only a signature", metadata.MD{MDSignature: {"x"}}, ErrMalformed, "nitrosign-caller is missing"},
		{"empty caller list", emptyCaller, ErrMalformed, "nitrosign-caller is missing"},
		{"caller twice", twice(MDCaller), ErrMalformed, "nitrosign-caller is given 2 times"},
		{"timestamp twice", twice(MDTimestamp), ErrMalformed, "nitrosign-timestamp is given 2 times"},
		{"nonce twice", twice(MDNonce), ErrMalformed, "nitrosign-nonce is given 2 times"},
		{"signature twice", twice(MDSignature), ErrMalformed, "nitrosign-signature-bin is given 2 times"},
		{"caller short", with(good, MDCaller, strings.Repeat("a", 63)), ErrMalformed, "nitrosign-caller: 63 characters"},
		{"caller long", with(good, MDCaller, strings.Repeat("a", 65)), ErrMalformed, "nitrosign-caller: 65 characters"},
		{"caller upper", with(good, MDCaller, strings.Repeat("a", 63)+"A"), ErrMalformed, "nitrosign-caller: character 63 is not a lower-case hex digit"},
		{"caller not hex", with(good, MDCaller, "g"+strings.Repeat("a", 63)), ErrMalformed, "nitrosign-caller: character 0"},
		{"caller newline", with(good, MDCaller, strings.Repeat("a", 63)+"\n"), ErrMalformed, "nitrosign-caller: character 63"},
		{"timestamp empty", with(good, MDTimestamp, ""), ErrMalformed, "nitrosign-timestamp: 0 characters"},
		{"timestamp leading zero", with(good, MDTimestamp, "01767225600000"), ErrMalformed, "nitrosign-timestamp: leading zero"},
		{"timestamp zeros", with(good, MDTimestamp, "00"), ErrMalformed, "leading zero"},
		{"timestamp sign", with(good, MDTimestamp, "+1767225600000"), ErrMalformed, "character 0 is not a decimal digit"},
		{"timestamp negative", with(good, MDTimestamp, "-1"), ErrMalformed, "character 0 is not a decimal digit"},
		{"timestamp space", with(good, MDTimestamp, "1767225600000 "), ErrMalformed, "character 13 is not a decimal digit"},
		{"timestamp fraction", with(good, MDTimestamp, "1767225600.000"), ErrMalformed, "character 10"},
		{"timestamp 16 digits", with(good, MDTimestamp, "1000000000000000"), ErrMalformed, "16 characters"},
		{"nonce short", with(good, MDNonce, strings.Repeat("0", 31)), ErrMalformed, "nitrosign-nonce: 31 characters"},
		{"nonce upper", with(good, MDNonce, strings.Repeat("0", 31)+"F"), ErrMalformed, "nitrosign-nonce: character 31"},
		{"signature empty", with(good, MDSignature, ""), ErrMalformed, "nitrosign-signature-bin: 0 bytes"},
		{"signature 81 bytes", with(good, MDSignature, strings.Repeat("x", 81)), ErrMalformed, "nitrosign-signature-bin: 81 bytes (want 1 to 80)"},
		{"signature 80 bytes", with(good, MDSignature, strings.Repeat("x", 80)), nil, ""},
		{"timestamp 0", with(good, MDTimestamp, "0"), nil, ""},
		{"timestamp 15 digits", with(good, MDTimestamp, "999999999999999"), nil, ""},
		{"good", good, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseMetadata(tc.md)
			if tc.want == "" && tc.is == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted: %+v", c)
			}
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want %v saying %q", err, tc.is, tc.want)
			}
			if errors.Is(err, ErrMissing) == errors.Is(err, ErrMalformed) {
				t.Fatalf("error %q wraps both or neither of ErrMissing, ErrMalformed", err)
			}
			// Never quoted: a value could be anything, a log line's end.
			for _, vs := range tc.md {
				for _, v := range vs {
					if len(v) >= 8 && strings.Contains(err.Error(), v) {
						t.Fatalf("error %q quotes the value %q", err, v)
					}
				}
			}
		})
	}
}

// ParseMetadata allocates the Claims only; Verify nothing for Ed25519.
func TestAllocations(t *testing.T) {
	msg := bytes.Repeat([]byte{7}, 200)
	for _, kind := range kinds {
		id := newID(t, kind)
		md := signedCall(t, id, msg)
		if n := testing.AllocsPerRun(100, func() { _, _ = ParseMetadata(md) }); n != 1 {
			t.Errorf("%s: ParseMetadata: %v allocations, want 1", kind, n)
		}
		c, _ := ParseMetadata(md)
		n := testing.AllocsPerRun(20, func() {
			if err := c.Verify(id.Public(), testMethod, msg); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("%s: Verify: %v allocations", kind, n)
		if kind == TypeEd25519 && n != 0 {
			t.Errorf("Ed25519 Verify: %v allocations, want 0", n)
		}
	}
}

func TestClaimsAccessors(t *testing.T) {
	id := newID(t, TypeP256)
	md := signedCall(t, id, nil)
	c, err := ParseMetadata(md)
	if err != nil {
		t.Fatal(err)
	}
	if c.Nonce() != md[MDNonce][0] || c.Caller() != md[MDCaller][0] || strconv.FormatInt(c.TimestampMillis(), 10) != md[MDTimestamp][0] {
		t.Fatal("accessors differ from the metadata")
	}
	if _, err := hex.DecodeString(c.Nonce()); err != nil {
		t.Fatal(err)
	}
}
