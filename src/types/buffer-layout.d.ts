// Minimal typings for the part of buffer-layout this project uses (the package ships none).
declare module 'buffer-layout' {
  export class Layout<T = unknown> {
    span: number;
    property?: string;
    decode(b: Buffer, offset?: number): T;
    encode(src: T, b: Buffer, offset?: number): number;
    getSpan(b?: Buffer, offset?: number): number;
  }
  export class Structure<T = Record<string, unknown>> extends Layout<T> {
    fields: Layout[];
  }
  export function struct<T = Record<string, unknown>>(fields: Layout<any>[], property?: string): Structure<T>;
  export function u8(property?: string): Layout<number>;
  export function u16be(property?: string): Layout<number>;
  export function u32be(property?: string): Layout<number>;
  export function nu64be(property?: string): Layout<number>;
  export function blob(length: number | Layout<number>, property?: string): Layout<Buffer>;
  const lo: {
    struct: typeof struct; u8: typeof u8; u16be: typeof u16be; u32be: typeof u32be;
    nu64be: typeof nu64be; blob: typeof blob;
  };
  export default lo;
}
