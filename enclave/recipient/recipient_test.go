package recipient

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"testing"
)

// testdata was made with OpenSSL 3.0 (openssl cms -encrypt), the shapes KMS
// sends and the ones it must not accept:
//
//	O="-keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 -keyopt rsa_mgf1_md:sha256"
//	oaep-ski-ber.der        -keyid $O -aes-256-cbc -stream -indef: BER, version 2,
//	                        subjectKeyIdentifier, content in segments (KMS's shape)
//	oaep-issuer-serial.der  $O -aes-256-cbc: DER, version 0
//	pkcs1v15.der            -aes-256-cbc: RSAES-PKCS1-v1_5
//	oaep-sha1.der           -keyopt rsa_padding_mode:oaep -aes-256-cbc: OAEP with SHA-1
//	aes128.der              $O -aes-128-cbc
//
// each of datakey.bin, to recipient.crt (recipient.key: a test key).

func load(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	blk, _ := pem.Decode(load(t, "recipient.key"))
	if blk == nil {
		t.Fatal("recipient.key: no PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return k.(*rsa.PrivateKey)
}

func TestDecrypt(t *testing.T) {
	key, want := testKey(t), load(t, "datakey.bin")
	for _, name := range []string{"oaep-ski-ber.der", "oaep-issuer-serial.der"} {
		t.Run(name, func(t *testing.T) {
			got, err := Decrypt(load(t, name), key)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("got %x, want %x", got, want)
			}
		})
	}
}

// What KMS never sends, or what another key sealed, is refused with its
// reason; nothing is returned.
func TestRefused(t *testing.T) {
	key := testKey(t)
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	good := load(t, "oaep-ski-ber.der")
	for _, tt := range []struct {
		name string
		in   []byte
		key  *rsa.PrivateKey
		want error
	}{
		{"RSAES-PKCS1-v1_5", load(t, "pkcs1v15.der"), key, ErrUnsupported},
		{"OAEP with SHA-1", load(t, "oaep-sha1.der"), key, ErrUnsupported},
		{"AES-128-CBC", load(t, "aes128.der"), key, ErrUnsupported},
		{"another key", good, other, ErrDecrypt},
		{"truncated", good[:len(good)/2], key, ErrMalformed},
		{"empty", nil, key, ErrMalformed},
		{"trailing bytes", append(append([]byte(nil), load(t, "oaep-issuer-serial.der")...), 0), key, ErrMalformed},
		{"too large", make([]byte, MaxSize+1), key, ErrMalformed},
		{"not CMS", []byte{0x30, 0x03, 0x02, 0x01, 0x00}, key, ErrMalformed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Decrypt(tt.in, tt.key)
			if !errors.Is(err, tt.want) || got != nil {
				t.Fatalf("Decrypt = %x, %v; want %v", got, err, tt.want)
			}
			t.Log(err)
		})
	}
	if _, err := Decrypt(good, nil); err == nil {
		t.Fatal("Decrypt without a key succeeded")
	}
}

// A flipped byte never makes Decrypt panic. In the encrypted key it is
// always refused (OAEP). In the IV or the content it may change what comes
// out: CBC is not authenticated, which is why the data key opened here is
// only ever used through an AEAD that fails on a wrong key (the sealed
// keyset's AES-GCM).
func TestEveryByteFlipped(t *testing.T) {
	key, want := testKey(t), load(t, "datakey.bin")
	good := load(t, "oaep-issuer-serial.der")
	root, _, err := parse(good, 0)
	if err != nil {
		t.Fatal(err)
	}
	ek := root.kids[1].kids[0].kids[1].kids[0].kids[3].content // the one recipient's encryptedKey
	if len(ek) != 256 {
		t.Fatalf("encryptedKey of %d bytes", len(ek))
	}
	start := bytes.Index(good, ek)
	refused, changed := 0, 0
	for i := range good {
		in := append([]byte(nil), good...)
		in[i] ^= 0x01
		got, err := Decrypt(in, key)
		switch {
		case err != nil:
			refused++
		case !bytes.Equal(got, want):
			changed++
			if i >= start && i < start+len(ek) {
				t.Fatalf("byte %d of the encrypted key flipped: opened to %x", i-start, got)
			}
		}
		if err == nil && i >= start && i < start+len(ek) {
			t.Fatalf("byte %d of the encrypted key flipped: no error", i-start)
		}
	}
	t.Logf("%d bytes flipped one at a time: %d refused, %d opened to another plaintext (IV and content: CBC), the rest unchecked (identifiers)", len(good), refused, changed)
}

func FuzzDecrypt(f *testing.F) {
	key := testKey(f)
	for _, n := range []string{"oaep-ski-ber.der", "oaep-issuer-serial.der", "pkcs1v15.der", "aes128.der"} {
		f.Add(load(f, n))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		_, _ = Decrypt(in, key) // must not panic or hang
	})
}
