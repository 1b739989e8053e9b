// Package keysetfmt reads and writes the frame of a sealed keyset, format
// 1 (docs/SEALING.md), without any key: the enclave seals and opens the
// body (enclave/sealing); the host stores the file and shows its header
// (host/keystore, nitrosign keyset show), which needs no KMS.
//
//	"NSKS"                 4 bytes, magic
//	format                 1 byte, 1
//	header length          4 bytes, big endian, then the header: JSON
//	                       {"format":1,"kms_key_arn":...,"key_ids":[...],
//	                        "created":RFC 3339,"sealed":RFC 3339}
//	data key blob length   4 bytes, big endian, then KMS's CiphertextBlob of
//	                       the data key
//	nonce                  12 bytes
//	ciphertext             AES-256-GCM under the data key of the keyset
//	                       body, with every byte before the nonce as
//	                       associated data
package keysetfmt

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Limits and sizes of format 1.
const (
	Magic         = "NSKS"
	Format        = 1
	MaxSize       = 1 << 20
	MaxHeaderSize = 16 << 10
	MaxBlobSize   = 4 << 10
	NonceSize     = 12
	tagSize       = 16
	prefixLen     = 4 + 1 + 4
)

// ErrCorrupt is wrapped by every error about a sealed keyset that does not
// parse; nothing of it is used then.
var ErrCorrupt = errors.New("sealed keyset corrupt")

// Header is the readable part of a sealed keyset.
type Header struct {
	Format    int       `json:"format"`
	KMSKeyARN string    `json:"kms_key_arn"`
	KeyIDs    []string  `json:"key_ids"`
	Created   time.Time `json:"created"`
	Sealed    time.Time `json:"sealed"`
}

// Parsed is a sealed keyset taken apart.
type Parsed struct {
	Header *Header
	// Blob is KMS's CiphertextBlob of the data key.
	Blob []byte
	// AAD is every byte before the nonce: the associated data.
	AAD        []byte
	Nonce      []byte
	Ciphertext []byte
}

// Frame returns the bytes before the nonce for a header and a data key
// blob: the associated data of the body.
func Frame(h Header, blob []byte) ([]byte, error) {
	h.Format = Format
	hdr, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if len(hdr) > MaxHeaderSize || len(blob) == 0 || len(blob) > MaxBlobSize {
		return nil, fmt.Errorf("header of %d bytes or data key blob of %d bytes: at most %d and %d", len(hdr), len(blob), MaxHeaderSize, MaxBlobSize)
	}
	var out bytes.Buffer
	out.WriteString(Magic)
	out.WriteByte(Format)
	_ = binary.Write(&out, binary.BigEndian, uint32(len(hdr)))
	out.Write(hdr)
	_ = binary.Write(&out, binary.BigEndian, uint32(len(blob)))
	out.Write(blob)
	return out.Bytes(), nil
}

// ReadHeader parses a sealed keyset's header: the format, KMS key and key
// ids it declares (which opening it then checks against the keys).
func ReadHeader(sealed []byte) (*Header, error) {
	p, err := Parse(sealed)
	if err != nil {
		return nil, err
	}
	return p.Header, nil
}

// Parse takes sealed apart; every malformed or truncated part wraps
// ErrCorrupt and names what is wrong.
func Parse(sealed []byte) (*Parsed, error) {
	if len(sealed) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrCorrupt, len(sealed), MaxSize)
	}
	if len(sealed) < prefixLen || string(sealed[:4]) != Magic {
		return nil, fmt.Errorf("%w: not a sealed keyset (no %q magic)", ErrCorrupt, Magic)
	}
	if sealed[4] != Format {
		return nil, fmt.Errorf("%w: format %d, this version reads format %d", ErrCorrupt, sealed[4], Format)
	}
	off := 5
	field := func(max int, what string) ([]byte, error) {
		if len(sealed) < off+4 {
			return nil, fmt.Errorf("%w: truncated in the %s length", ErrCorrupt, what)
		}
		n64 := uint64(binary.BigEndian.Uint32(sealed[off:]))
		off += 4
		if n64 == 0 || n64 > uint64(max) || uint64(len(sealed)-off) < n64 {
			return nil, fmt.Errorf("%w: %s of %d bytes (at most %d, %d left)", ErrCorrupt, what, n64, max, len(sealed)-off)
		}
		n := int(n64)
		b := sealed[off : off+n]
		off += n
		return b, nil
	}
	hdrJSON, err := field(MaxHeaderSize, "header")
	if err != nil {
		return nil, err
	}
	var h Header
	dec := json.NewDecoder(bytes.NewReader(hdrJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil || h.Format != Format || h.KMSKeyARN == "" || len(h.KeyIDs) == 0 {
		return nil, fmt.Errorf("%w: header does not parse as format %d", ErrCorrupt, Format)
	}
	blob, err := field(MaxBlobSize, "data key blob")
	if err != nil {
		return nil, err
	}
	if len(sealed) < off+NonceSize+tagSize {
		return nil, fmt.Errorf("%w: truncated before the encrypted keyset", ErrCorrupt)
	}
	return &Parsed{Header: &h, Blob: blob, AAD: sealed[:off], Nonce: sealed[off : off+NonceSize], Ciphertext: sealed[off+NonceSize:]}, nil
}
