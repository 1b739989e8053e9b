// Package recipient opens what AWS KMS returns to an attested enclave in
// CiphertextForRecipient (GenerateDataKey, Decrypt with a Recipient): a CMS
// EnvelopedData (RFC 5652 section 6) whose content, a data key, is
// encrypted with AES-256-CBC under a content key that is itself encrypted
// with RSAES-OAEP (SHA-256, MGF1 with SHA-256; RFC 8017, RFC 4055) to the
// ephemeral RSA public key the enclave put in its attestation document.
// Only the enclave, which holds the private key, can open it; the parent
// instance that relays it sees ciphertext only.
//
// KMS encodes it in BER, with indefinite lengths and the encrypted content
// in segments (the AWS Nitro Enclaves SDK's parser expects the same), so
// this package reads BER, not only DER; and it accepts exactly that shape:
// version 0 or 2, key transport recipients only, those algorithms only.
// Anything else is refused with a precise error and nothing is decrypted.
//
// CBC is not authenticated: a changed IV or content byte can change what
// Decrypt returns instead of failing. KMS's envelope is what it is; the
// data key opened here must only be used through an AEAD (the sealed
// keyset's AES-256-GCM), which fails on a wrong key.
package recipient

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/asn1"
	"errors"
	"fmt"
)

// MaxSize bounds the input: a data key's envelope is well under 2 KiB.
const MaxSize = 64 << 10

// ErrMalformed is wrapped by every error about the structure of the input;
// ErrUnsupported by every error about an algorithm or version it does not
// accept; ErrDecrypt when no recipient could be opened with the key or the
// content does not decrypt.
var (
	ErrMalformed   = errors.New("recipient: malformed CMS EnvelopedData")
	ErrUnsupported = errors.New("recipient: unsupported CMS EnvelopedData")
	ErrDecrypt     = errors.New("recipient: cannot decrypt")
)

var (
	oidEnvelopedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 3}
	oidData          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidRSAESOAEP     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
	oidMGF1          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 8}
	oidSHA256        = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}
	oidAES256CBC     = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
)

// Decrypt opens env with key and returns its content (the data key).
func Decrypt(env []byte, key *rsa.PrivateKey) ([]byte, error) {
	if key == nil {
		return nil, errors.New("recipient: no private key")
	}
	if len(env) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(env), MaxSize)
	}
	root, rest, err := parse(env, 0)
	if err != nil {
		return nil, err
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the ContentInfo", ErrMalformed, len(rest))
	}
	// ContentInfo ::= SEQUENCE { contentType OID, content [0] EXPLICIT ANY }
	ci, err := root.children(tagSequence, 2, "ContentInfo")
	if err != nil {
		return nil, err
	}
	if oid, err := ci[0].oid("ContentInfo contentType"); err != nil {
		return nil, err
	} else if !oid.Equal(oidEnvelopedData) {
		return nil, fmt.Errorf("%w: content type %v, want envelopedData", ErrUnsupported, oid)
	}
	wrapped, err := ci[1].children(contextTag(0), 1, "ContentInfo content")
	if err != nil {
		return nil, err
	}
	// EnvelopedData ::= SEQUENCE { version, originatorInfo [0] OPTIONAL,
	//   recipientInfos SET, encryptedContentInfo, unprotectedAttrs [1] OPTIONAL }
	ed, err := wrapped[0].all(tagSequence, "EnvelopedData")
	if err != nil {
		return nil, err
	}
	if len(ed) < 3 {
		return nil, fmt.Errorf("%w: EnvelopedData has %d fields", ErrMalformed, len(ed))
	}
	if v, err := ed[0].smallInt("EnvelopedData version"); err != nil {
		return nil, err
	} else if v != 0 && v != 2 {
		return nil, fmt.Errorf("%w: EnvelopedData version %d, want 0 or 2", ErrUnsupported, v)
	}
	i := 1
	if ed[i].tag == contextTag(0) {
		return nil, fmt.Errorf("%w: originatorInfo present (key agreement), want key transport only", ErrUnsupported)
	}
	ris, err := ed[i].all(tagSet, "recipientInfos")
	if err != nil {
		return nil, err
	}
	if len(ris) == 0 {
		return nil, fmt.Errorf("%w: no recipientInfos", ErrMalformed)
	}
	eci := ed[i+1]
	cek, err := openKey(ris, key)
	if err != nil {
		return nil, err
	}
	return openContent(eci, cek)
}

// openKey returns the content-encryption key from the first key transport
// recipient the key opens.
func openKey(ris []*node, key *rsa.PrivateKey) ([]byte, error) {
	var lastErr error
	for _, ri := range ris {
		// KeyTransRecipientInfo ::= SEQUENCE { version, rid, keyEncryptionAlgorithm, encryptedKey }
		if ri.tag != tagSequence {
			lastErr = fmt.Errorf("%w: a recipient that is not key transport (tag %#x)", ErrUnsupported, ri.tag)
			continue
		}
		f, err := ri.children(tagSequence, 4, "KeyTransRecipientInfo")
		if err != nil {
			return nil, err
		}
		v, err := f[0].smallInt("KeyTransRecipientInfo version")
		if err != nil {
			return nil, err
		}
		if v != 0 && v != 2 {
			return nil, fmt.Errorf("%w: KeyTransRecipientInfo version %d, want 0 or 2", ErrUnsupported, v)
		}
		if err := checkOAEP(f[2]); err != nil {
			return nil, err
		}
		ek, err := f[3].octets("encryptedKey")
		if err != nil {
			return nil, err
		}
		cek, err := rsa.DecryptOAEP(sha256.New(), nil, key, ek, nil)
		if err != nil {
			lastErr = fmt.Errorf("%w: the encrypted key does not open with this private key", ErrDecrypt)
			continue
		}
		return cek, nil
	}
	return nil, lastErr
}

// checkOAEP accepts RSAES-OAEP with SHA-256, MGF1 with SHA-256 and no label
// (RFC 4055 RSAES-OAEP-params), refusing the SHA-1 defaults.
func checkOAEP(alg *node) error {
	f, err := alg.all(tagSequence, "keyEncryptionAlgorithm")
	if err != nil {
		return err
	}
	if len(f) < 1 {
		return fmt.Errorf("%w: empty keyEncryptionAlgorithm", ErrMalformed)
	}
	oid, err := f[0].oid("keyEncryptionAlgorithm")
	if err != nil {
		return err
	}
	if !oid.Equal(oidRSAESOAEP) {
		return fmt.Errorf("%w: key encryption %v, want RSAES-OAEP with SHA-256", ErrUnsupported, oid)
	}
	if len(f) != 2 {
		return fmt.Errorf("%w: RSAES-OAEP without parameters means SHA-1, want SHA-256", ErrUnsupported)
	}
	params, err := f[1].all(tagSequence, "RSAES-OAEP-params")
	if err != nil {
		return err
	}
	var hash, mgfHash asn1.ObjectIdentifier
	for _, p := range params {
		switch p.tag {
		case contextTag(0): // hashAlgorithm
			h, err := p.children(contextTag(0), 1, "OAEP hashAlgorithm")
			if err != nil {
				return err
			}
			if hash, err = algOID(h[0], "OAEP hashAlgorithm"); err != nil {
				return err
			}
		case contextTag(1): // maskGenAlgorithm
			m, err := p.children(contextTag(1), 1, "OAEP maskGenAlgorithm")
			if err != nil {
				return err
			}
			mf, err := m[0].children(tagSequence, 2, "OAEP maskGenAlgorithm")
			if err != nil {
				return err
			}
			if o, err := mf[0].oid("OAEP maskGenAlgorithm"); err != nil {
				return err
			} else if !o.Equal(oidMGF1) {
				return fmt.Errorf("%w: OAEP mask generation %v, want MGF1", ErrUnsupported, o)
			}
			if mgfHash, err = algOID(mf[1], "MGF1 hash"); err != nil {
				return err
			}
		case contextTag(2): // pSourceAlgorithm: a label, which KMS does not use
			return fmt.Errorf("%w: OAEP label (pSourceAlgorithm) present", ErrUnsupported)
		default:
			return fmt.Errorf("%w: unknown RSAES-OAEP-params field %#x", ErrMalformed, p.tag)
		}
	}
	if !hash.Equal(oidSHA256) || !mgfHash.Equal(oidSHA256) {
		return fmt.Errorf("%w: OAEP with hash %v and MGF1 hash %v, want SHA-256 for both (an absent one means SHA-1)", ErrUnsupported, nameOr(hash), nameOr(mgfHash))
	}
	return nil
}

func nameOr(o asn1.ObjectIdentifier) string {
	if o == nil {
		return "SHA-1 (default)"
	}
	return o.String()
}

// algOID is the OID of an AlgorithmIdentifier (parameters ignored: NULL or
// absent for the hashes).
func algOID(n *node, what string) (asn1.ObjectIdentifier, error) {
	f, err := n.all(tagSequence, what)
	if err != nil {
		return nil, err
	}
	if len(f) == 0 {
		return nil, fmt.Errorf("%w: empty %s", ErrMalformed, what)
	}
	return f[0].oid(what)
}

// openContent decrypts EncryptedContentInfo ::= SEQUENCE { contentType,
// contentEncryptionAlgorithm, encryptedContent [0] IMPLICIT OCTET STRING }.
func openContent(eci *node, cek []byte) ([]byte, error) {
	f, err := eci.all(tagSequence, "EncryptedContentInfo")
	if err != nil {
		return nil, err
	}
	if len(f) != 3 {
		return nil, fmt.Errorf("%w: EncryptedContentInfo has %d fields, want 3 (content present)", ErrMalformed, len(f))
	}
	if o, err := f[0].oid("encrypted content type"); err != nil {
		return nil, err
	} else if !o.Equal(oidData) {
		return nil, fmt.Errorf("%w: encrypted content type %v, want data", ErrUnsupported, o)
	}
	alg, err := f[1].children(tagSequence, 2, "contentEncryptionAlgorithm")
	if err != nil {
		return nil, err
	}
	if o, err := alg[0].oid("contentEncryptionAlgorithm"); err != nil {
		return nil, err
	} else if !o.Equal(oidAES256CBC) {
		return nil, fmt.Errorf("%w: content encryption %v, want AES-256-CBC", ErrUnsupported, o)
	}
	iv, err := alg[1].octets("AES-CBC IV")
	if err != nil {
		return nil, err
	}
	if len(iv) != aes.BlockSize {
		return nil, fmt.Errorf("%w: AES-CBC IV of %d bytes", ErrMalformed, len(iv))
	}
	if f[2].tag != contextTag(0)&^constructed && f[2].tag != contextTag(0) {
		return nil, fmt.Errorf("%w: encryptedContent has tag %#x", ErrMalformed, f[2].tag)
	}
	ct, err := f[2].bytes("encryptedContent")
	if err != nil {
		return nil, err
	}
	if len(cek) != 32 {
		return nil, fmt.Errorf("%w: content key of %d bytes for AES-256", ErrDecrypt, len(cek))
	}
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("%w: encrypted content of %d bytes is not whole AES blocks", ErrMalformed, len(ct))
	}
	block, err := aes.NewCipher(cek)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDecrypt, err)
	}
	pt := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(pt, ct)
	return unpad(pt)
}

// unpad removes PKCS#7 padding, checking every padding byte.
func unpad(b []byte) ([]byte, error) {
	n := int(b[len(b)-1])
	if n == 0 || n > aes.BlockSize || n > len(b) {
		return nil, fmt.Errorf("%w: bad padding (wrong content key?)", ErrDecrypt)
	}
	if subtle.ConstantTimeCompare(b[len(b)-n:], bytes.Repeat([]byte{byte(n)}, n)) != 1 {
		return nil, fmt.Errorf("%w: bad padding (wrong content key?)", ErrDecrypt)
	}
	return b[:len(b)-n], nil
}
